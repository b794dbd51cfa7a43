"""Turn PaliGemma's text answers into boxes, masks and pictures."""
