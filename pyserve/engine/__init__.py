"""Engine side: async engine (lead), detokenizer, stop strings. Deliberately imports nothing:
`import pyserve.engine.stop` must not load the C++ extension."""
