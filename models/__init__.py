"""sparsec.models"""
