"""Register TrashWorld with Gymnasium, on request only.

Gymnasium 1.x has no plugin discovery (the `gymnasium.envs` entry points of gym 0.2x were
removed), so an entry point in pyproject would never run; and registering when a chisel module
is imported would be hidden global state. So registration is one explicit, idempotent call:

    >>> import gymnasium, chisel.envs
    >>> env_id = chisel.envs.register()
    >>> env = gymnasium.make(env_id, button="early", p_blue_given_trash=0.5)
    >>> env.unwrapped.config.button
    'early'
"""

from __future__ import annotations

ENV_ID = "chisel/TrashWorld-v0"


def register() -> str:
    """Register `chisel/TrashWorld-v0` with Gymnasium (once; later calls do nothing) and
    return its id. `gymnasium.make(ENV_ID, **options)` passes `options` (TrashWorldConfig
    fields: button, button_after_steps, p_blue_given_trash, p_blue_given_no_trash, …, or
    `config=TrashWorldConfig(...)`, and `render_mode="ansi"`) to `TrashWorld`. Episodes are
    truncated by the env itself after `max_steps`, so no TimeLimit wrapper is added.
    `gymnasium.make_vec(ENV_ID, num_envs=64, **options)` builds the numpy-batched
    `TrashWorldVectorEnv` (pass vectorization_mode="sync" for a loop over `TrashWorld`s)."""
    import gymnasium

    if ENV_ID not in gymnasium.registry:
        gymnasium.register(
            id=ENV_ID,
            entry_point="chisel.envs.trashworld:TrashWorld",
            vector_entry_point="chisel.envs.vector:TrashWorldVectorEnv",
        )
    return ENV_ID
