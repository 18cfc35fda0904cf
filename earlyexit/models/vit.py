MODELS: dict = {}  # filled in by the architecture implementation
