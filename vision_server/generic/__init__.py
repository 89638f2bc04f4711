"""Transformers image-to-text models other than Florence-2: BLIP, GIT, ViT+GPT-2, Idefics3/SmolVLM.

One :class:`~vision_server.generic.family.Family` per architecture knows how to load the model,
build its inputs from images and an optional free-text prompt, and which output tokens are the
caption; :class:`~vision_server.generic.captioner.GenericCaptioner` does the rest (batches,
generation options, token counts, out-of-memory, unload) the same way for all of them.
"""
