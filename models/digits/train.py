"""Train the digits residual CNN and write `digits_resnet.onnx` (reproducible; needs torch).

    pip install torch==2.13.0 && python -m models.digits.train

torch is used here only; everything that runs the model afterwards (evaluation, compression
passes, tests) reads the ONNX file with onnxruntime.

Architecture (NCHW, 8x8 input): stem Conv3x3(1->32)+BN+ReLU; layers.0 and layers.1 = basic
residual blocks at 32 channels; layers.2 = a stride-2 block to 64 channels with a 1x1 projection
shortcut; layers.3 = a block at 64; GlobalAveragePool, Flatten, Gemm(64->10) -> logits. The
residual Adds give channel pruning coupled channels to respect and block removal whole blocks
to drop.

The ONNX graph is written by hand with onnx.helper from the trained weights (not torch.onnx.export)
so it holds exactly the standard ops we choose: Conv, BatchNormalization (kept as separate nodes
with their running statistics, so the compiler's BN folding has work to do), Relu, Add,
GlobalAveragePool, Flatten, Gemm; opset 17, ir_version 8, static batch 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .data import INPUT_NAME, load_splits
from .evaluate import predict

OUTPUT = Path(__file__).with_name("digits_resnet.onnx")
OUTPUT_NAME = "logits"
EPOCHS = 60
SEED = 0
# (input channels, output channels, stride) of each residual block, in order
BLOCKS = ((32, 32, 1), (32, 32, 1), (32, 64, 2), (64, 64, 1))


def _torch_model():
    """The torch network; module names are the ONNX node/weight names (see `to_onnx`)."""
    import torch.nn as nn

    class BasicBlock(nn.Module):
        """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU. The shortcut is the identity
        unless the block changes shape, then a 1x1 strided conv + BN projection."""

        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)  # BN supplies the bias
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = None
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                              nn.BatchNorm2d(cout))

        def forward(self, x):
            out = self.bn2(self.conv2(self.bn1(self.conv1(x)).relu()))
            identity = x if self.shortcut is None else self.shortcut(x)
            return (out + identity).relu()

    class DigitsResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32))
            self.layers = nn.ModuleList(BasicBlock(*block) for block in BLOCKS)
            self.fc = nn.Linear(BLOCKS[-1][1], 10)

        def forward(self, x):
            x = self.stem(x).relu()
            for block in self.layers:
                x = block(x)
            return self.fc(x.mean(dim=(2, 3)))

    return DigitsResNet()


def _augment(torch, x):
    """Shift the whole batch by up to one pixel each way (zero fill): with only 1,437 training
    images of 8x8 the net otherwise overfits to where the digit sits."""
    shifted = torch.zeros_like(x)
    dx, dy = np.random.randint(-1, 2, size=2)
    src = x[:, :, max(0, -dy):8 - max(0, dy), max(0, -dx):8 - max(0, dx)]
    shifted[:, :, max(0, dy):8 - max(0, -dy), max(0, dx):8 - max(0, -dx)] = src
    return shifted


def train():
    """Train on the train split only (test and calibration come from `data.load_splits`).

    AdamW (Adam with decoupled weight decay) with a cosine schedule and light label smoothing;
    every random source (init, batch order, shifts) is seeded and torch is set deterministic, so
    a rerun on the same machine reproduces the committed weights bit for bit.
    """
    import torch
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.use_deterministic_algorithms(True)
    splits = load_splits()
    x_train, y_train = torch.tensor(splits.x_train), torch.tensor(splits.y_train)
    net = _torch_model()
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, EPOCHS)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.05)
    for _ in range(EPOCHS):
        net.train()
        for batch in torch.randperm(len(x_train)).split(64):
            optimizer.zero_grad()
            loss = loss_fn(net(_augment(torch, x_train[batch])), y_train[batch])
            loss.backward()
            optimizer.step()
        scheduler.step()
    net.eval()
    return net


class _GraphBuilder:
    """Collects nodes and initializers; each helper names the node after the torch module and
    its output `<node>_out`, so graph names match the torch state dict (`layers.0.conv1.weight`)."""

    def __init__(self):
        self.nodes, self.inits = [], []

    def weight(self, name, tensor):
        """Store a trained torch tensor as initializer `name`; returns the name."""
        self.inits.append(numpy_helper.from_array(tensor.detach().numpy(), name))
        return name

    def conv(self, name, conv, x):
        weight = self.weight(f"{name}.weight", conv.weight)
        self.nodes.append(helper.make_node(
            "Conv", [x, weight], [f"{name}_out"], name=name, kernel_shape=list(conv.kernel_size),
            strides=list(conv.stride), pads=list(conv.padding) * 2))
        return f"{name}_out"

    def bn(self, name, bn, x):
        inputs = [self.weight(f"{name}.{key}", getattr(bn, key))
                  for key in ("weight", "bias", "running_mean", "running_var")]
        self.nodes.append(helper.make_node("BatchNormalization", [x, *inputs], [f"{name}_out"],
                                           name=name, epsilon=bn.eps))
        return f"{name}_out"

    def op(self, op_type, name, inputs, output=None, **attrs):
        output = output or f"{name}_out"
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=name, **attrs))
        return output


def to_onnx(net) -> onnx.ModelProto:
    """The trained net as a checked ONNX model: input `input` [1,1,8,8], output `logits` [1,10]."""
    g = _GraphBuilder()
    x = g.op("Relu", "stem.relu", [g.bn("stem.bn", net.stem[1],
                                        g.conv("stem.conv", net.stem[0], INPUT_NAME))])
    for index, block in enumerate(net.layers):
        prefix = f"layers.{index}"
        out = g.conv(f"{prefix}.conv1", block.conv1, x)
        out = g.op("Relu", f"{prefix}.relu1", [g.bn(f"{prefix}.bn1", block.bn1, out)])
        out = g.bn(f"{prefix}.bn2", block.bn2, g.conv(f"{prefix}.conv2", block.conv2, out))
        identity = x
        if block.shortcut is not None:
            identity = g.bn(f"{prefix}.shortcut.bn", block.shortcut[1],
                            g.conv(f"{prefix}.shortcut.conv", block.shortcut[0], x))
        x = g.op("Relu", f"{prefix}.relu2", [g.op("Add", f"{prefix}.add", [out, identity])])
    x = g.op("Flatten", "flatten", [g.op("GlobalAveragePool", "pool", [x])])
    fc_inputs = [x, g.weight("fc.weight", net.fc.weight), g.weight("fc.bias", net.fc.bias)]
    # torch's Linear stores its weight as [out, in], hence transB=1
    g.op("Gemm", "fc", fc_inputs, output=OUTPUT_NAME, transB=1)
    graph = helper.make_graph(
        g.nodes, "digits_resnet",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [1, 10])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="models.digits.train")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def main():
    """Train, export, check the export against torch on the test split, and save the model with
    the measured numbers in its metadata."""
    import torch
    net = train()
    splits = load_splits()
    with torch.no_grad():
        torch_logits = net(torch.tensor(splits.x_test)).numpy()
    model = to_onnx(net)
    onnx_logits = predict(model.SerializeToString(), splits.x_test)
    torch_top1 = float((torch_logits.argmax(1) == splits.y_test).mean() * 100)
    onnx_top1 = float((onnx_logits.argmax(1) == splits.y_test).mean() * 100)
    max_diff = float(np.abs(onnx_logits - torch_logits).max())
    print(f"test top1: torch={torch_top1:.2f} onnxruntime={onnx_top1:.2f}; "
          f"max |logit diff| torch vs onnxruntime={max_diff:.2e}")
    helper.set_model_props(model, {
        "dataset": "sklearn-digits",
        "split": "train_test_split(test_size=0.2, random_state=0, stratify=y)",
        "input_scaling": "pixels/16.0",
        "test_top1": f"{onnx_top1:.2f}",  # onnxruntime on the 360 test images
        "torch_onnx_max_abs_diff": f"{max_diff:.2e}",
        "train_command": "python -m models.digits.train",
    })
    onnx.save(model, OUTPUT)
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
