"""How close a converted model stays to its dense original: next-token metrics for language models
(``language``)."""
