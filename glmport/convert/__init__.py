"""Remote-code ChatGLM models as other tools take them.

* :mod:`.native` - ``glmport convert SRC OUT --to native``: transformers' ``GlmForCausalLM``;
* :mod:`.weights` - the parameter names of both, shared with :mod:`glmport.tiny.build`;
* :mod:`.tokenizer`, :mod:`.chat_template` - the fast tokenizer and the chat template of a native folder;
* :mod:`.standalone` - glmport's compat patches as plain code in a folder (``glmport export``);
* :mod:`.outdir` - writing OUT whole or not at all.

Nothing is imported here: :mod:`glmport.tiny.build` reads :mod:`.weights` without the rest.
"""
