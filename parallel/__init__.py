"""parallel package: the layouts (mesh), tensor, pipeline and sequence parallelism, ZeRO."""

import warnings

# megatron-core warns on import, once per module and rank, that Transformer Engine and Apex are missing
# and its fused optimizers and kernels fall back to plain ones. This stack uses neither (only its process
# groups and tensor-parallel layers), so the warnings would only bury a run's first lines.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed",
                        category=UserWarning)
