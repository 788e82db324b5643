"""sparsec's own fuzzer: random valid graphs (generator) and checks that do not trust the report."""
