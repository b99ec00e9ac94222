"""Official LLaMA-Adapter V2 and LaVIN checkpoints → PEFT adapter folders (spec `llama_adapter_v2.md` §2, §9;
`lavin_mma.md` §5, §9).

    from peft_mma.convert import convert_llama_adapter_v2, convert_lavin
    summary = convert_llama_adapter_v2("BIAS-7B.pth", "path/to/hf-llama-7b", "out/bias-7b")
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained("path/to/hf-llama-7b"), "out/bias-7b")

Command line: `python -m peft_mma.convert {llama-adapter-v2,lavin} CHECKPOINT --base HF_LLAMA_DIR --out OUT_DIR`.
"""

from .adapter_folder import ConversionSummary
from .checkpoint import ConversionError
from .lavin import convert_lavin
from .llama_adapter_v2 import convert_llama_adapter_v2
from .rope import meta_to_hf_rows

__all__ = ["ConversionError", "ConversionSummary", "convert_lavin", "convert_llama_adapter_v2", "meta_to_hf_rows"]
