"""Suite-wide settings."""

import torch

# Tiny models run fastest on one thread, and a second thread only spins when another process
# competes for the two cores of these machines.
torch.set_num_threads(1)
