"""sparsec.runtime"""
