"""Publishing to the Hugging Face Hub (``publish``): the folder a checkpoint is uploaded as (adapter weights, config,
remote code, rendered model card) and its upload in one commit."""
