"""vision-server caption node for ComfyUI: copy this folder into ``ComfyUI/custom_nodes/``."""

from .vision_caption_node import VisionServerCaption

NODE_CLASS_MAPPINGS = {"VisionServerCaption": VisionServerCaption}
NODE_DISPLAY_NAME_MAPPINGS = {"VisionServerCaption": "Vision Server Caption"}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
