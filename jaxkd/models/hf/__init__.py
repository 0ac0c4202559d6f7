"""Hugging Face causal LMs as jaxkd teachers and students: config, weights and tokenizer.

From a local directory holding config.json and safetensors (nothing is downloaded):

  model = hf.load_pretrained(directory, dtype=jnp.bfloat16, mesh=None)  # a TransformerLM
  tokenizer = hf.load_tokenizer(directory)
  hf.save_pretrained(student, out_directory, tokenizer_directory=directory)

Families (`FAMILIES`): llama, qwen2, qwen3, gemma, gemma2, gemma3_text, gpt2; the supported and
refused config.json fields are listed in docs/huggingface.md. `safetensors` and `tokenizers` are
imported when used (the `hf` extra), `transformers` never.
"""

from jaxkd.models.hf.config import FAMILIES, decoder_config, hf_config
from jaxkd.models.hf.tokenizer import HFTokenizer, check_same_tokenizer, load_tokenizer
from jaxkd.models.hf.weights import load_pretrained, read_config, save_pretrained

__all__ = [
  "FAMILIES",
  "HFTokenizer",
  "check_same_tokenizer",
  "decoder_config",
  "hf_config",
  "load_pretrained",
  "load_tokenizer",
  "read_config",
  "save_pretrained",
]
