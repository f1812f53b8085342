"""Generated code of the inference APIs stealguard speaks besides its own
(TorchServe, Open Inference Protocol v2)."""
