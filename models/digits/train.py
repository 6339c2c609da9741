"""Train the digits residual CNN and write `digits_resnet.onnx` (reproducible; needs torch).

    pip install torch==2.13.0 && python -m models.digits.train

Architecture (NCHW, 8x8 input): stem Conv3x3(1->32)+BN+ReLU; two basic residual blocks at 32
channels; a stride-2 block to 64 channels with a 1x1 projection shortcut; one block at 64;
GlobalAveragePool, Flatten, Gemm(64->10). The ONNX graph is written by hand with onnx.helper from
the trained weights (not torch.onnx.export) so it is plain and standard: Conv, BatchNormalization
(kept separate, with its running statistics, so the compiler's BN folding has work to do), Relu,
Add, GlobalAveragePool, Flatten, Gemm; opset 17, static batch 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .data import INPUT_NAME, load_splits

OUTPUT = Path(__file__).with_name("digits_resnet.onnx")
EPOCHS = 60
SEED = 0


def _torch_model():
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
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

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32))
            self.layers = nn.ModuleList([Block(32, 32, 1), Block(32, 32, 1), Block(32, 64, 2),
                                         Block(64, 64, 1)])
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            x = self.stem(x).relu()
            for block in self.layers:
                x = block(x)
            return self.fc(x.mean(dim=(2, 3)))

    return Net()


def _augment(torch, x):
    """Random shifts of up to one pixel (zero fill): the digits are small and few."""
    shifted = torch.zeros_like(x)
    dx, dy = np.random.randint(-1, 2, size=2)
    src = x[:, :, max(0, -dy):8 - max(0, dy), max(0, -dx):8 - max(0, dx)]
    shifted[:, :, max(0, dy):8 - max(0, -dy), max(0, dx):8 - max(0, -dx)] = src
    return shifted


def train():
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


def _conv(nodes, inits, name, conv, x, stride=1, pad=1):
    weight = f"{name}.weight"
    inits.append(numpy_helper.from_array(conv.weight.detach().numpy(), weight))
    nodes.append(helper.make_node("Conv", [x, weight], [f"{name}_out"], name=name,
                                  kernel_shape=list(conv.kernel_size), strides=[stride, stride],
                                  pads=[pad] * 4))
    return f"{name}_out"


def _bn(nodes, inits, name, bn, x):
    params = {"weight": bn.weight, "bias": bn.bias, "running_mean": bn.running_mean,
              "running_var": bn.running_var}
    names = []
    for key, tensor in params.items():
        inits.append(numpy_helper.from_array(tensor.detach().numpy(), f"{name}.{key}"))
        names.append(f"{name}.{key}")
    nodes.append(helper.make_node("BatchNormalization", [x, *names], [f"{name}_out"], name=name,
                                  epsilon=bn.eps))
    return f"{name}_out"


def _relu(nodes, name, x):
    nodes.append(helper.make_node("Relu", [x], [f"{name}_out"], name=name))
    return f"{name}_out"


def to_onnx(net, test_top1: float) -> onnx.ModelProto:
    nodes, inits = [], []
    x = _relu(nodes, "stem.relu", _bn(nodes, inits, "stem.bn", net.stem[1],
                                      _conv(nodes, inits, "stem.conv", net.stem[0], INPUT_NAME)))
    for index, block in enumerate(net.layers):
        prefix = f"layers.{index}"
        stride = block.conv1.stride[0]
        out = _conv(nodes, inits, f"{prefix}.conv1", block.conv1, x, stride)
        out = _relu(nodes, f"{prefix}.relu1", _bn(nodes, inits, f"{prefix}.bn1", block.bn1, out))
        out = _bn(nodes, inits, f"{prefix}.bn2", block.bn2,
                  _conv(nodes, inits, f"{prefix}.conv2", block.conv2, out))
        identity = x
        if block.shortcut is not None:
            identity = _bn(nodes, inits, f"{prefix}.shortcut.bn", block.shortcut[1],
                           _conv(nodes, inits, f"{prefix}.shortcut.conv", block.shortcut[0], x,
                                 stride, pad=0))
        nodes.append(helper.make_node("Add", [out, identity], [f"{prefix}.add_out"],
                                      name=f"{prefix}.add"))
        x = _relu(nodes, f"{prefix}.relu2", f"{prefix}.add_out")
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool_out"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pool_out"], ["flatten_out"], name="flatten"))
    inits.append(numpy_helper.from_array(net.fc.weight.detach().numpy(), "fc.weight"))
    inits.append(numpy_helper.from_array(net.fc.bias.detach().numpy(), "fc.bias"))
    nodes.append(helper.make_node("Gemm", ["flatten_out", "fc.weight", "fc.bias"], ["logits"],
                                  name="fc", transB=1))
    graph = helper.make_graph(
        nodes, "digits_resnet",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="models.digits.train")
    model.ir_version = 8
    helper.set_model_props(model, {"dataset": "sklearn-digits", "split": "test_size=0.2,seed=0",
                                   "test_top1": f"{test_top1:.2f}"})
    onnx.checker.check_model(model)
    return model


def main():
    import torch
    from .evaluate import evaluate
    net = train()
    splits = load_splits()
    with torch.no_grad():
        logits = net(torch.tensor(splits.x_test)).numpy()
    torch_top1 = float((logits.argmax(1) == splits.y_test).mean() * 100)
    model = to_onnx(net, torch_top1)
    onnx_top1 = evaluate(model.SerializeToString())
    import onnxruntime as ort
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    onnx_logits = np.concatenate([session.run(None, {INPUT_NAME: x[None]})[0]
                                  for x in splits.x_test])
    print(f"torch top1={torch_top1:.2f} onnxruntime top1={onnx_top1:.2f} "
          f"max|diff|={np.abs(onnx_logits - logits).max():.2e}")
    onnx.save(model, OUTPUT)
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
