"""Builtin patch sets for modeling_chatglm.py (installed as ``glmport.patches``)."""
