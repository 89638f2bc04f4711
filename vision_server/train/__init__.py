"""``vision-server train``: fine-tune a Florence-2 model on captioned images as a PEFT LoRA adapter.

One concept per module: ``options`` (what the user asked for), ``dataset`` (reading and checking
the captions before anything loads), ``augment`` (tag shuffling and dropout), ``model`` (base model
and LoRA), ``loop`` (the training itself), ``checkpoint`` (saving and resuming), ``reporting``
(progress bar, TensorBoard/wandb), ``metadata`` (the small file that says how an adapter was made)
and ``command`` (the click command). Only ``metadata`` is imported by the server, and it needs
nothing beyond the standard library.
"""
