"""Using a trained model: ``dpgan-agent generate``, ``export`` and ``evaluate`` on one checkpoint.

- ``loading.py``: a checkpoint file (or an agent's folder) → the generator it holds, rebuilt from the
  configuration stored in the checkpoint, and the latent streams every command draws from;
- ``generate.py``: samples to a PNG, ``.npy``, ``.safetensors`` or a folder of PNGs;
- ``export.py``: a generator plain PyTorch loads without this package (TorchScript, and safetensors +
  JSON architecture with the MLP's layer scales folded into the weights);
- ``evaluate.py``: the quality metrics the agents report, through ``agent.train.evaluate.Evaluator``;
- ``cli.py``: the three commands' argument parsing and error reporting.

Nothing here is imported by the agent itself; ``agent.cli`` imports ``agent.tools.cli`` lazily.
"""
