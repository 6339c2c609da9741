"""Apache TVM backend: lower our IR to Relax (`lower`), pick targets (`targets`), schedule
(`schedule`) or tune (`tune`), build deployable artifacts (`build.compile_artifact`) and run them
on the device (`run`, which needs only tvm + numpy). See README.md in this folder."""
