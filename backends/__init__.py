"""Builtin device backends (installed as ``glmport.backends``).

This package is the only place in glmport that may touch device APIs (``torch.cuda``, ``torch.mlu``,
``torch_mlu``), collective backends (``nccl``, ``cncl``) or visible-devices variables; a meta-test
enforces it. Each module is a plugin that registers its backend through ``glmport_register_backends``,
exactly like a third-party plugin would.
"""
