"""The graph and its bookkeeping: load/save, tensor store, graph index, layers, shapes, options, pipeline,
report. Imports no other sparsec package."""
