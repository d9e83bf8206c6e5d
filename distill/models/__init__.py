"""Model components: loading (hub id or local folder), tiny builders, encoding, LoRA, EMA."""

from distill.models.conditioning import decode_latents, encode_images, encode_prompts, time_ids
from distill.models.loader import Components, ModelNotFoundError, load_components, resolve_model_path

__all__ = ["Components", "ModelNotFoundError", "load_components", "resolve_model_path", "encode_prompts",
           "encode_images", "decode_latents", "time_ids"]
