"""The model and data of a run: base model through the backend's patch session, data through its template,
then the training method (LoRA, P-Tuning v2, full SFT) on top.

The seed is set before anything is built, so the same seed gives the same starting weights, including
the method's new ones (LoRA matrices, prefix encoders).
"""

from __future__ import annotations

import logging

from glmport.data.loader import LoadResult
from glmport.data.templates import Detection, detect_family, get_template
from glmport.errors import GlmportError, ModelError, Problem
from glmport.modeling import inspect_model_dir, load_model, resolve_dtype
from glmport.train.checkpointing import apply_checkpointing, compile_layers, requested_mode
from glmport.train.dataset import build_datasets
from glmport.train.inputs import remote_code_consent
from glmport.train.methods import apply_method, prefix_config_overrides
from glmport.train.quantization import bitsandbytes_config, check_quantized, prepare_for_training
from glmport.train.state import TrainingRun

log = logging.getLogger("glmport")


def load_base_model(run: TrainingRun, patch_sets) -> None:
    """Seed, place and load the model in the dtype the backend and family call for; sets ``run.loaded``
    and ``run.template``. ``patch_sets`` is the plugin manager's registry of patch sets."""
    config, backend = run.config, run.backend
    backend.set_device(run.ranks.local_rank)
    backend.seed(int(config.glmport.seed if config.glmport.seed is not None else config.training_args.get("seed", 42)))
    info = inspect_model_dir(config.model_dir.resolve(), config.glmport.model_family)
    dtype, note = resolve_dtype(config.glmport.dtype, backend, info.family, config.method)
    if note:
        log.warning(note)
        run.notes.append(note)
    detected: list[Detection] = []

    def detect(tokenizer) -> None:  # before the weights load: a tokenizer of another generation stops here
        detected.append(detect_family(tokenizer, info.config, template=config.glmport.template,
                                      model_family=config.glmport.model_family, template_key="glmport.template"))
        if detected[0].family != info.family and info.family_from.startswith("remote code"):
            raise ModelError(f"{info.path}: the model's code and its tokenizer are of different generations", [
                Problem("modeling_chatglm.py", f"{info.family_from}: {info.family} code"),
                Problem("tokenizer", f"{'; '.join(detected[0].evidence)}: a {detected[0].family} tokenizer",
                        "put the tokenizer files of the same model download next to its code")])
        if detected[0].family != info.family:  # only when config.json did not say (info.family_from == "guess")
            raise ModelError(f"{info.path}: config.json does not tell the model family; its tokenizer does", [Problem(
                "glmport.model_family", f"{'; '.join(detected[0].evidence)}: a {detected[0].family} tokenizer, but "
                f"{info.family} was assumed for the patches and dtype", f"set glmport.model_family: {detected[0].family}")])

    quantization = config.glmport.quantization
    run.loaded = load_model(
        info, backend, mode="train", dtype=dtype, patch_sets=patch_sets,
        config_overrides=prefix_config_overrides(info, config.peft_config), consent=remote_code_consent(config),
        check_tokenizer=detect, quantization_config=bitsandbytes_config(quantization, dtype),
    )
    if quantization != "none":  # QLoRA (glmport.train.quantization): checked before the run, readied here
        check_quantized(run.loaded.model, quantization, info)
        run.loaded.model = prepare_for_training(run.loaded.model)
        run.notes.append(f"QLoRA: base model in {quantization} through bitsandbytes (glmport.quantization)")
    log.info("%s", detected[0].describe())
    run.template = get_template(detected[0].template, run.loaded.tokenizer, combine=config.combine,
                                detection=detected[0])


def build_data(run: TrainingRun, records: dict[str, LoadResult], has_eval: bool) -> None:
    """Tokenize the splits read by :func:`glmport.train.inputs.read_records`; sets ``run.datasets``."""
    run.datasets = build_datasets(run.config, run.template, run.output_dir if run.ranks.is_main else None, records)
    if run.datasets.train is None:
        raise GlmportError(f"{run.config.data_path('train')}: no training samples")
    if not has_eval:
        run.datasets.eval = None


def apply_training_method(run: TrainingRun) -> None:
    """Wrap or freeze the loaded model for the method, and turn checkpointing on if asked; sets ``run.model``."""
    config = run.config
    run.model = apply_method(run.loaded.model, run.loaded.info, config.method, config.peft_config, run.backend)
    plan = apply_checkpointing(run.model, run.loaded.info, requested_mode(config), backend=run.backend, config=config,
                               method=config.method)
    if "decision" in plan:  # auto: what it chose and why, before the first step
        run.notes.append(plan["decision"])
    if config.glmport.compile:
        run.notes.append(f"compiled {compile_layers(run.model, run.backend)} transformer layers with torch.compile "
                         "(glmport.compile)")
