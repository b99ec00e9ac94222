"""peft_mma: LLaMA-Adapter V2 and LaVIN (Mixture-of-Modality Adaptation) as PEFT methods.

Importing the package registers both methods with PEFT; `get_peft_model`, `PeftModel.from_pretrained` and
`AutoPeftModelForCausalLM` then work with `LlamaAdapterV2Config` and `LaVINConfig`.
"""

from .card import push_to_hub
from .lavin import LaVINConfig, LaVINModel
from .llama_adapter_v2 import LlamaAdapterV2Config, LlamaAdapterV2Model
from .optim import create_mma_optimizer
from .registry import MMA_ADAPTER_V2, MMA_LAVIN, register_all

register_all()

__all__ = [
    "MMA_ADAPTER_V2",
    "MMA_LAVIN",
    "LaVINConfig",
    "LaVINModel",
    "LlamaAdapterV2Config",
    "LlamaAdapterV2Model",
    "create_mma_optimizer",
    "push_to_hub",
]
__version__ = "0.1.0.dev0"
