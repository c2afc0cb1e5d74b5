"""Compile: ``torch.compile(model, backend="moefx")``, the fx passes it runs on Dynamo graphs
(``passes.PRE_GRAD_PASSES``, in order), and the op's decomposition in Inductor's table (``decompose``)."""
