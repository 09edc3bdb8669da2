"""What every diffusers backbone family shares: ``diffusers_backbone`` (the arguments, parts, freezing,
loading sequence, LoRA stages and VAE latent space), ``weight_loading`` (hub ids, local folders, one
original-layout file, and their errors), ``variants`` (named variants and family detection),
``lora_adapters`` (peft LoRA). It imports no family."""
