"""Pure-PyTorch networks of the cascade (no ray / deepspeed / torch.distributed / fsspec here)."""
from .flavors import Flavor, build_network, count_params, get_flavor, list_flavors
from .prior_transformer import PriorConfig, PriorTransformer
from .unet import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig", "PriorTransformer", "PriorConfig", "Flavor", "build_network",
           "get_flavor", "list_flavors", "count_params"]
