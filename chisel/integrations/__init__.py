"""Attach chisel to training libraries in one line.

Each integration is a module imported on use, so `import chisel` never imports the library:

- `chisel.integrations.sb3`: Stable-Baselines3 on-policy algorithms (PPO, A2C), with
  `pip install chisel-rl[sb3]`.
- `chisel.integrations.hf`: `transformers.Trainer` and TRL trainers (GRPO tagged per
  completion), with `pip install chisel-rl[hf]`.
- `chisel.integrations.tensorboard`: the live view of `chisel.record(..., tensorboard=True)`
  and `chisel tensorboard RUN_DIR`, with `pip install chisel-rl[tensorboard]`.
- `chisel.integrations.optimizers.unwrap_optimizer`: the hookable optimizer inside wrappers
  such as accelerate's `AcceleratedOptimizer`.
"""
