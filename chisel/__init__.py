"""chisel: see what reward chiseled into an RL agent."""
