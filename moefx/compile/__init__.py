"""Compile: ``torch.compile(model, backend="moefx")`` and the fx passes it runs on Dynamo graphs
(``passes.PRE_GRAD_PASSES``, in order)."""
