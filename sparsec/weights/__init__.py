"""Weight pruning: which weights (selection, scores, masks) and the passes that zero them."""
