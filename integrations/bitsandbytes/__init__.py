"""bitsandbytes 4-bit and 8-bit bases (QLoRA-style ID-LoRA): the weight plugin that dequantizes for the clustering."""
