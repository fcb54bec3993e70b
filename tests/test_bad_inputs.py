"""The catalogue of bad inputs: every one gets one line `automodel: error: ...`, exit code 2, no traceback,
and leaves the working folder (and any hydra.run.dir it names) exactly as it was.

One subprocess (bad_input_runner.py) imports automodel once and forks a child per case, so the catalogue
costs about one import plus the cases themselves (a refusal inside launched ranks, which needs real
processes, is test_launch.py's). `{fx}` in a case's arguments is the folder of files the cases read (built
by `_fixtures`). A case marked xfail is a known gap; its reason names the file that needs the fix.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys

import pytest
from helpers import MICRO

HERE = os.path.dirname(os.path.abspath(__file__))
PREFIX = "automodel: error: "
TINY_TOKENIZER = os.path.join(os.path.dirname(HERE), "automodel", "resources", "tiny_tasks", "tokenizer")
PAIRS = ["data=instruction", "data.path={fx}/pairs.jsonl"]  # well-formed data, for cases about something else


def xfail(case_id, args, *phrases, fix: str):
    return pytest.param(case_id, args, phrases, id=case_id, marks=pytest.mark.xfail(strict=True, reason=fix))


def case(case_id, args, *phrases):
    return pytest.param(case_id, args, phrases, id=case_id)


# (id, argv, phrases the one line must contain). Each is a different mistake a user makes.
CASES = [
    # ---- override syntax and config groups
    case("override_without_value", ["train.max_steps"], "train.max_steps", "key=value"),
    case("override_without_key", ["=1"], "'=1'", "key=value"),
    case("override_empty_path_segment", ["train..x=1"], "train..x=1", "key=value"),
    case("unknown_flag", ["--nosuchflag"], "--nosuchflag"),
    case("unknown_group", ["optimizer=adam"], "optimizer", "valid"),
    case("unknown_option", ["optim=sgd"], "optim=sgd: no such option", "adamw"),
    case("unknown_option_precision", ["precision=int4"], "precision=int4: no such option", "bf16, fp16, fp32, fp8"),
    case("deleted_group", ["~optim"], "optim", "optim=<option>"),
    case("unknown_logger", ["logger=[jsonl,neptune]"], "logger=neptune: no such option",
         "jsonl, mlflow, tensorboard, wandb"),
    case("logger_bad_mode", ["logger=wandb", "logger.wandb.mode=cloud"], "logger.wandb.mode='cloud'",
         "online, offline, disabled"),
    case("plan_without_world_size", ["plan", "model=tiny"], "automodel plan needs plan.world_size=N"),
    case("plan_unknown_gpu", ["plan", "plan.world_size=8", "plan.gpu=tpu9"], "plan.gpu='tpu9'", "h100"),
    case("logger_unknown_key", ["logger=mlflow", "logger.mlflow.uri=x"], "logger.mlflow.uri: unknown key",
         "tracking_uri"),
    case("unknown_optim_key", ["optim.momentum=0.9"], "optim.momentum: unknown key", "beta1"),
    case("append_existing_key", ["+train.seed=1"], "+train.seed", "drop the '+'"),
    # ---- train.*
    case("max_steps_zero", ["train.max_steps=0"], "train.max_steps=0", "at least 1"),
    case("log_every_zero", ["train.log_every=0"], "train.log_every=0", "at least 1"),
    case("val_every_negative", ["train.val_every=-1"], "train.val_every=-1", "0"),
    case("eval_every_negative", ["train.eval_every=-1"], "train.eval_every=-1", "0 turns evaluation off"),
    case("eval_bad_device", ["eval.device=tpu"], "eval.device='tpu'", "auto, cpu, cuda"),
    case("eval_without_target", ["eval"], "automodel eval", "RUN_OR_FOLDER"),
    case("eval_unknown_setting", ["eval", "{fx}/unknown_type", "train.max_steps=3"],
         "'train.max_steps=3' is not an eval setting"),
    case("eval_adapter", ["eval", "{fx}/adapter"], "holds a PEFT adapter, not a model"),
    case("eval_garbled_model", ["eval", "{fx}/garbled_config"], "could not be loaded as a model"),
    case("sample_prompts_negative", ["train.sample_prompts=-1"], "train.sample_prompts=-1", "0"),
    case("global_batch_zero", ["train.global_batch_size=0"], "train.global_batch_size=0", "at least 1"),
    case("micro_above_global", ["train.micro_batch_size=64"], "train.micro_batch_size=64", "train.global_batch_size="),
    case("global_not_multiple_of_micro", ["train.global_batch_size=32", "train.micro_batch_size=5"],
         "train.global_batch_size=32 is not divisible", "multiple of 5"),
    case("max_grad_norm_negative", ["train.max_grad_norm=-1"], "train.max_grad_norm=-1", ">= 0"),
    case("max_bad_steps_zero", ["train.max_bad_steps=0"], "train.max_bad_steps=0", "at least 1"),
    case("spike_factor_below_one", ["train.spike_factor=0.5"], "train.spike_factor=0.5", "above 1"),
    case("spike_window_zero", ["train.spike_window=0"], "train.spike_window=0", "at least 1"),
    case("device_unknown", ["train.device=tpu"], "train.device='tpu'", "auto, cpu, cuda"),
    case("seed_not_an_int", ["train.seed=1.5"], "train.seed=1.5", "expected int"),
    case("seq_len_above_model_positions", ["train.seq_len=10000000"], "train.seq_len=10000000",
         "max_position_embeddings"),
    # ---- optim.*
    case("lr_nan", ["optim.lr=nan"], "optim.lr=nan", "positive"),
    case("lr_inf", ["optim.lr=inf"], "optim.lr=inf", "finite"),
    case("lr_zero", ["optim.lr=0"], "optim.lr=0", "positive"),
    case("weight_decay_negative", ["optim.weight_decay=-0.1"], "optim.weight_decay=-0.1", ">= 0"),
    case("beta1_one", ["optim.beta1=1.0"], "optim.beta1=1.0", "[0, 1)"),
    case("beta2_negative", ["optim.beta2=-0.5"], "optim.beta2=-0.5", "[0, 1)"),
    case("eps_zero", ["optim.eps=0"], "optim.eps=0", "positive"),
    case("warmup_negative", ["optim.warmup_steps=-5"], "optim.warmup_steps=-5", ">= 0"),
    case("min_lr_ratio_above_one", ["optim.min_lr_ratio=1.5"], "optim.min_lr_ratio=1.5", "[0, 1]"),
    case("min_lr_ratio_negative", ["optim.min_lr_ratio=-0.1"], "optim.min_lr_ratio=-0.1", "[0, 1]"),
    case("lr_not_a_number", ["optim.lr=fast"], "optim.lr='fast'", "expected float"),
    # ---- peft.*
    case("lora_r_zero", ["peft=lora", "peft.r=0"], "peft.r=0", "at least 1"),
    case("lora_r_negative", ["peft=lora", "peft.r=-4"], "peft.r=-4", "at least 1"),
    case("lora_dropout_above_one", ["peft=lora", "peft.dropout=1.5"], "peft.dropout=1.5", "[0, 1)"),
    case("lora_alpha_zero", ["peft=lora", "peft.alpha=0"], "peft.alpha=0", "positive"),
    case("lora_target_missing", ["peft=lora", "peft.target_modules=[q_proj,nosuch_proj]"], "nosuch_proj",
         "q_proj"),
    case("lora_target_empty", ["peft=lora", "peft.target_modules=[]"], "peft.target_modules", "all-linear"),
    case("lora_init_unknown", ["peft=lora", "peft.init=pissa"], "peft.init='pissa'", "gaussian"),
    case("qlora_without_bitsandbytes", ["peft=qlora"], "peft=qlora needs bitsandbytes", "pip install 'automodel[qlora]'"),
    case("qlora_quantization_unknown", ["peft=lora", "peft.quantize_base=int3"], "peft.quantize_base='int3'", "nf4"),
    case("qlora_with_dora", ["peft=qlora", "peft.use_dora=true"], "peft.use_dora=true with a 4-bit base",
         "peft=qlora or peft=dora"),
    # ---- loss.*
    case("loss_unknown", ["loss=focal"], "loss=focal", "chunked_ce"),
    case("chunked_loss_chunk_zero", ["loss=chunked_ce", "loss.chunk_tokens=0"], "loss.chunk_tokens=0", "positive"),
    case("chunked_loss_with_lora_on_the_head", ["loss=chunked_ce", "peft=lora", "peft.target_modules=[q_proj,lm_head]"],
         "plain Linear layer", "use loss=ce"),
    case("liger_loss_without_cuda", ["loss=liger"], "loss=liger", "loss=chunked_ce"),
    # ---- teacher.*
    case("teacher_without_path", ["teacher=hf"], "teacher.model.path", "mandatory"),
    case("teacher_path_missing", ["teacher=hf", "teacher.model.path=/nonexistent/teacher"],
         "teacher.model.path='/nonexistent/teacher'", "not an existing folder"),
    case("teacher_kd_ratio_above_one", ["teacher=hf", "teacher.model.path={fx}/empty_dir", "teacher.kd_ratio=1.5"],
         "teacher.kd_ratio=1.5", "[0, 1]"),
    case("teacher_temperature_zero", ["teacher=hf", "teacher.model.path={fx}/empty_dir", "teacher.temperature=0"],
         "teacher.temperature=0", "positive"),
    # ---- precision.* and parallel.*
    case("bf16_reduce_dtype_unknown", ["precision=bf16", "precision.reduce_dtype=float99"],
         "precision.reduce_dtype='float99'", "float32"),
    case("dp_shard_three_on_one_process", ["parallel=fsdp2", "parallel.dp_shard=3"], "dp_shard=3", "world size is 1"),
    case("tp_zero", ["parallel=tp", "parallel.tp=0"], "parallel.tp=0", "positive"),
    case("pp_negative", ["parallel=pp", "parallel.pp=-2"], "parallel.pp=-2", "positive"),
    case("two_inferred_sizes", ["parallel=fsdp2", "parallel.tp=-1"], "only one size may be -1"),
    case("activation_checkpointing_unknown", ["parallel=fsdp2", "parallel.activation_checkpointing=some"],
         "parallel.activation_checkpointing='some'", "selective"),
    case("pp_schedule_unknown", ["parallel=pp", "parallel.pp_schedule=zigzag"], "parallel.pp_schedule", "1f1b"),
    case("experts_implementation_on_dense", ["model.experts_implementation=eager"], "no routed experts",
         "leave it null"),
    case("moe_aux_loss_negative", ["moe.aux_loss_coef=-1"], "moe.aux_loss_coef=-1", ">= 0"),
    # ---- launcher and hydra
    case("nproc_per_node_zero", ["launcher.nproc_per_node=0"], "launcher.nproc_per_node=0", "at least 1"),
    case("fake_world_size_negative", ["launcher.fake_world_size=-1"], "launcher.fake_world_size=-1", "0"),
    case("fake_world_with_nproc", ["launcher.fake_world_size=4", "launcher.nproc_per_node=2"],
         "launcher.fake_world_size", "drop launcher.nproc_per_node"),
    case("nproc_not_an_int", ["launcher.nproc_per_node=two"], "launcher.nproc_per_node='two'", "expected int"),
    case("nproc_two_layout_impossible", ["launcher.nproc_per_node=2", "parallel=fsdp2", "parallel.dp_shard=3"],
         "dp_shard=3", "world size is 2"),
    case("run_dir_under_a_file", ["hydra.run.dir={fx}/a_file/run"], "hydra.run.dir", "a_file"),
    case("sweep_with_one_bad_point", ["-m", "optim.lr=1e-3,-1"], "optim.lr=-1"),
    case("slurm_launcher_without_slurm", ["-m", "hydra/launcher=slurm", "optim.lr=1e-3"], "hydra/launcher=slurm",
         "sbatch"),
    # ---- model folders and model.*
    case("model_folder_is_an_adapter", ["model=hf", "model.path={fx}/adapter"], "adapter",
         "base model", "meta-llama/Llama-3.2-1B"),
    case("model_folder_empty", ["model=hf", "model.path={fx}/empty_dir"], "empty_dir", "config.json"),
    case("model_folder_unknown_type", ["model=hf", "model.path={fx}/unknown_type"], "nosuch_arch",
         "model_type"),
    case("model_folder_corrupt_safetensors", ["model=hf", "model.path={fx}/corrupt_weights",
                                              f"model.tokenizer={TINY_TOKENIZER}", *PAIRS],
         "model.safetensors", "cannot read"),
    case("model_hub_id_offline", ["model=hf", "model.path=nobody-here/no-such-model"], "nobody-here/no-such-model",
         "offline"),
    case("model_path_missing", ["model=hf", "model.path=/nonexistent/model"], "/nonexistent/model",
         "not an existing folder"),
    case("model_path_is_a_file", ["model=hf", "model.path={fx}/a_file"], "a_file", "folder"),
    case("tokenizer_missing", ["model.tokenizer=/nonexistent/tok"], "model.tokenizer='/nonexistent/tok'"),
    case("model_config_wrong_type", ["model.config.hidden_size=wide"], "model.config.hidden_size='wide'", "int"),
    case("heads_do_not_divide_hidden", ["model.config.num_attention_heads=3"], "model.config",
         "not a multiple of the number of attention heads (3)"),
    case("model_without_layers", ["model.config.num_hidden_layers=0"], "num_hidden_layers=0", "at least 1"),
    case("model_folder_config_not_json", ["model=hf", "model.path={fx}/garbled_config"], "config.json",
         "not valid JSON"),
    case("model_folder_remote_code", ["model=hf", "model.path={fx}/remote_code"], "model.trust_remote_code=true"),
    case("attn_implementation_unknown", ["model.attn_implementation=flash9"], "model.attn_implementation='flash9'",
         "sdpa"),
    case("vocab_smaller_than_tokenizer", ["model.config.vocab_size=100"], "100 token embeddings", "vocab_size"),
    # ---- data
    case("data_binary_file", ["data=instruction", "data.path={fx}/random.jsonl"], "random.jsonl", "UTF-8"),
    case("data_empty_file", ["data=instruction", "data.path={fx}/empty.jsonl"], "empty.jsonl", "no examples"),
    case("data_only_blank_lines", ["data=instruction", "data.path={fx}/blank.jsonl"], "blank.jsonl",
         "no examples"),
    case("data_csv_wrong_columns", ["data=instruction", "data.path={fx}/wrong.csv"], "no column 'prompt'",
         "data.prompt_column"),
    case("data_parquet_wrong_columns", ["data=instruction", "data.path={fx}/wrong.parquet"], "no column 'prompt'",
         "question"),
    case("data_path_is_a_directory", ["data=instruction", "data.path={fx}/empty_dir"], "empty_dir",
         "save_to_disk"),
    case("data_unknown_extension", ["data=instruction", "data.path={fx}/pairs.xlsx"], "unknown file type '.xlsx'"),
    case("data_path_unset", ["data=instruction"], "data.path", "missing"),
    case("data_packing_not_a_bool", [*PAIRS, "data.packing=sometimes"], "data.packing='sometimes'",
         "bool"),
    case("data_val_size_negative", [*PAIRS, "data.val_size=-3"], "data.val_size=-3", ">= 0"),
    case("data_val_split_of_a_file", [*PAIRS, "data.val_split=validation"], "no split 'validation'"),
    case("data_template_unknown_column", [*PAIRS, "data.prompt_template='Q: {question}'"], "question",
         "prompt, completion"),
    case("data_text_empty_txt", ["data=text", "data.path={fx}/empty.txt"], "empty.txt", "no examples"),
    case("data_hub_id_offline", ["data=instruction", "data.path=nobody-here/no-such-set"],
         "nobody-here/no-such-set", "local"),
    case("data_chat_without_messages", ["data=chat", "data.path={fx}/pairs.jsonl"], "no column 'messages'"),
    case("data_array_of_strings", ["data=instruction", "data.path={fx}/strings.json"], "strings.json",
         "JSON object"),
    case("seq_len_too_short", [*PAIRS, "train.seq_len=1"], "train.seq_len=1"),
    # ---- data wrong in shape (each trained without a word before)
    case("data_completion_is_a_list", ["data=instruction", "data.path={fx}/list_completion.jsonl"],
         "list_completion.jsonl:2: 'completion' is a list ([\" 12\"]), not text"),
    case("data_prompt_is_an_object", ["data=instruction", "data.path={fx}/object_prompt.jsonl"],
         "object_prompt.jsonl:1: 'prompt' is an object"),
    case("data_all_completions_empty", ["data=instruction", "data.path={fx}/empty_completions.jsonl"],
         "all 64 usable examples have nothing in their completion", "end-of-sequence"),
    case("data_same_column_twice", [*PAIRS, "data.prompt_column=completion"],
         "data.prompt_column and data.completion_column are both 'completion'"),
    case("data_mostly_longer_than_seq_len", ["data=instruction", "data.path={fx}/long.jsonl"],
         "48 of 64 examples (75%) are longer than train.seq_len=64", "p95", "keeps 95% of them"),
    case("data_dropped_fraction_above_one", [*PAIRS, "data.max_dropped_fraction=2"], "data.max_dropped_fraction=2.0",
         "[0, 1]"),
    case("data_line_over_max_record_bytes", ["data=instruction", "data.path={fx}/big_line.jsonl",
                                             "data.max_record_bytes=1000"],
         "big_line.jsonl:3: this line is longer than data.max_record_bytes=1000"),
    case("data_path_with_a_tilde", ["data=instruction", "data.path=~/automodel-no-such-file.jsonl"],
         f"data.path='{os.path.expanduser('~/automodel-no-such-file.jsonl')}' does not exist"),
    case("data_squad_file_with_a_split", ["data=squad", "data.path={fx}/dev-v1.1.json", "data.val_split=validation"],
         "is one file, which has no split 'validation'", "data.val_split=null data.val_size=N"),
    case("data_val_split_and_val_size", ["data=squad", "data.val_split=validation", "data.val_size=5"],
         "both choose the held-out data", "data.val_split=null data.val_size=5"),
    case("sweep_without_multirun", ["optim.lr=1e-3,3e-3"], "optim.lr=1e-3,3e-3", "add -m to sweep"),
    case("tokenizer_json_truncated", ["model=hf", "model.path={fx}/truncated_tokenizer"],
         "truncated_tokenizer': tokenizer.json is not valid JSON"),
    case("tokenizer_json_not_a_tokenizer", ["model=hf", "model.path={fx}/odd_tokenizer"],
         "the tokenizer in this folder could not be loaded", "'added_tokens'"),
    case("lora_target_string_missing", ["peft=lora", "peft.target_modules=nosuch_proj"],
         "'nosuch_proj' names no module", "q_proj"),
    # ---- checkpoints
    case("resume_path_missing", ["checkpoint.resume=/nonexistent/run"], "/nonexistent/run", "does not exist"),
    case("resume_not_a_checkpoint", [*MICRO, "checkpoint.resume={fx}/empty_dir"], "no complete checkpoint",
         "empty_dir"),
    case("resume_step_folder_without_meta", [*MICRO, "checkpoint.resume={fx}/ckpt/step_00000010"],
         "not a complete automodel checkpoint"),
    case("resume_corrupt_meta", [*MICRO, "checkpoint.resume={fx}/badmeta/step_00000010"], "is corrupt",
         "automodel_ckpt.json"),
    case("every_steps_negative", ["checkpoint.every_steps=-1"], "checkpoint.every_steps=-1", "0 (never)"),
    case("keep_last_negative", ["checkpoint.keep_last=-1"], "checkpoint.keep_last=-1", "0 (keep all)"),
    case("export_missing_checkpoint", ["export", "/nonexistent/ckpt", "{fx}/out"], "/nonexistent/ckpt"),
    case("export_without_out", ["export", "{fx}/ckpt"], "export", "OUT"),
    case("export_not_a_checkpoint", ["export", "{fx}/empty_dir", "{fx}/out"], "no complete checkpoint"),
    case("generate_adapter_folder", ["generate", "{fx}/adapter", "hi"], "adapter", "merged"),
    case("generate_no_prompt", ["generate", "{fx}/adapter"], "PROMPT", "usage: automodel generate"),
    case("generate_missing_folder", ["generate", "/nonexistent/final", "hi"], "/nonexistent/final", "final"),
    case("list_with_arguments", ["list", "models"], "takes no arguments"),
    case("plot_missing_path", ["plot", "/nonexistent/run"], "/nonexistent/run", "does not exist", "metrics.jsonl"),
    case("plot_folder_without_metrics", ["plot", "{fx}/empty_dir"], "holds no metrics.jsonl", "sweep directory"),
    case("plot_without_path", ["plot"], "RUN_OR_SWEEP", "usage: automodel plot"),
    case("generate_zero_tokens", ["generate", "{fx}/adapter", "hi", "--max-new-tokens", "0"],
         "--max-new-tokens", "at least 1"),
    # ---- plugins
    case("plugin_not_installed", ["optim.plugin=sgd"], "optim.plugin='sgd' is not an installed plugin", "adamw"),
    case("plugin_fails_to_import", ["optim.plugin=broken"], "optim.plugin='broken'", "automodel-badplugins",
         "automodel_nosuch_module"),
    case("plugin_without_config", ["optim.plugin=noconfig"], "does not declare a dataclass `Config`"),
    case("plugin_not_allowed", ["optim.plugin=noconfig"], "optim.plugin='noconfig' is not an installed plugin"),
    case("plugin_option_without_plugin", ["optim=noplugin"], "optim", "plugin: <name>"),
]
ENV = {"plugin_not_allowed": {"AUTOMODEL_PLUGINS": "someone-else"},
       "slurm_launcher_without_slurm": {"PATH": "{fx}/empty_dir"}}  # no sbatch here, even on a SLURM node
SITE_CASES = {"plugin_fails_to_import", "plugin_without_config", "plugin_not_allowed", "plugin_option_without_plugin"}


# ------------------------------------------------------------------ fixtures
def _safetensors(path: str, shapes: dict[str, tuple[int, ...]]) -> None:
    """A valid safetensors file of zeros (written by hand: no tensor library needed)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4
        for d in shape:
            size *= d
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + bytes(offset))


def _write(path: str, data) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return path


def _fixtures(fx: str) -> None:
    rng = random.Random(0)
    _write(f"{fx}/a_file", "not a folder\n")
    os.makedirs(f"{fx}/empty_dir")
    pair = json.dumps({"prompt": "sort: 3 1 2 =>", "completion": " 1 2 3"})
    _write(f"{fx}/pairs.jsonl", "\n".join([pair] * 64) + "\n")
    _write(f"{fx}/pairs.xlsx", b"PK\x03\x04 not really a spreadsheet")
    _write(f"{fx}/random.jsonl", bytes(rng.getrandbits(8) for _ in range(4096)))
    _write(f"{fx}/empty.jsonl", "")
    _write(f"{fx}/empty.txt", "")
    _write(f"{fx}/blank.jsonl", "\n   \n\t\n\n")
    _write(f"{fx}/wrong.csv", "question,answer\nwhat,that\nwho,them\n")
    _write(f"{fx}/strings.json", json.dumps(["one", "two"]))
    lines = [json.dumps({"prompt": f"add {i} 1 =>", "completion": f" {i + 1}"}) for i in range(64)]
    _write(f"{fx}/list_completion.jsonl", "\n".join([lines[0], json.dumps({"prompt": "x", "completion": [" 12"]}),
                                                     *lines[2:]]) + "\n")
    _write(f"{fx}/object_prompt.jsonl", "\n".join([json.dumps({"prompt": {"text": "x"}, "completion": " 1"}),
                                                   *lines[1:]]) + "\n")
    _write(f"{fx}/empty_completions.jsonl", "".join(json.dumps({"prompt": f"q{i} =>", "completion": ""}) + "\n"
                                                    for i in range(64)))
    _write(f"{fx}/long.jsonl", "".join(json.dumps({"prompt": "sort: " + "9 " * (10 + 40 * (i % 4 != 0)) + "=>",
                                                   "completion": " 9"}) + "\n" for i in range(64)))
    _write(f"{fx}/big_line.jsonl", "\n".join([*lines[:2], json.dumps({"prompt": "x" * 5000, "completion": "y"}),
                                              *lines[3:]]) + "\n")
    _write(f"{fx}/dev-v1.1.json", json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": "Box 1 is red.", "qas": [{"id": "q1", "question": "Colour?",
                                              "answers": [{"text": "red", "answer_start": 9}]}]}]}]}, indent=1))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["what", "who"], "answer": ["that", "them"]}), f"{fx}/wrong.parquet")
    # a PEFT adapter where a model should be
    _write(f"{fx}/adapter/adapter_config.json", json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "meta-llama/Llama-3.2-1B",
        "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}))
    _safetensors(f"{fx}/adapter/adapter_model.safetensors",
                 {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (8, 64)})
    _write(f"{fx}/unknown_type/config.json", json.dumps({"model_type": "nosuch_arch", "hidden_size": 64}))
    micro = {"model_type": "llama", "vocab_size": 384, "hidden_size": 64, "intermediate_size": 128,
             "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 4,
             "max_position_embeddings": 256, "tie_word_embeddings": False, "architectures": ["LlamaForCausalLM"]}
    _write(f"{fx}/corrupt_weights/config.json", json.dumps(micro))
    _write(f"{fx}/garbled_config/config.json", "{\"model_type\": \"llama\", ")
    # model folders whose tokenizer is broken: a truncated copy, and JSON that is not a tokenizer
    for name, tokenizer_json in (("truncated_tokenizer", '{"version": "1.0", "model": '),
                                 ("odd_tokenizer", '{"version": "1.0", "model": {"type": "Nope"}}')):
        _write(f"{fx}/{name}/config.json", json.dumps(micro))
        _write(f"{fx}/{name}/tokenizer.json", tokenizer_json)
    _write(f"{fx}/remote_code/config.json", json.dumps({
        "model_type": "my_arch", "auto_map": {"AutoConfig": "configuration_my.MyConfig"}}))
    _write(f"{fx}/corrupt_weights/model.safetensors", struct.pack("<Q", 10 ** 6) + b"{\"oops\": tru")
    # checkpoints that are not: a step folder without its description, and one whose description is garbled
    _write(f"{fx}/ckpt/step_00000010/__0_0.distcp", b"\0" * 64)
    _write(f"{fx}/badmeta/step_00000010/automodel_ckpt.json", "{\"step\": 10, \"files\": ")
    # an installed distribution whose plugins are broken: one cannot import, one has no Config
    site = f"{fx}/site"
    _write(f"{site}/automodel_badplugins-0.1.dist-info/METADATA",
           "Metadata-Version: 2.1\nName: automodel-badplugins\nVersion: 0.1\n")
    _write(f"{site}/automodel_badplugins-0.1.dist-info/entry_points.txt",
           "[automodel.optim]\nbroken = automodel_nosuch_module:Opt\nnoconfig = automodel_badplugins_mod:NoConfig\n"
           "[automodel.conf]\nbad = automodel_badplugins_conf\n")
    _write(f"{site}/automodel_badplugins_mod.py", "class NoConfig:\n    pass\n")
    _write(f"{site}/automodel_badplugins_conf/__init__.py", "")
    _write(f"{site}/automodel_badplugins_conf/optim/noplugin.yaml", "lr: 1.0e-3  # names no plugin\n")


# A case the product wrongly accepts would train the default model for 500 steps: every training command line
# gets these (unless it sets the key itself), so such a case costs seconds and still fails.
SHORT = ("train.max_steps=2", "train.global_batch_size=4", "train.sample_prompts=0", "checkpoint.export_final=false")
SUBCOMMANDS = ("list", "generate", "export", "plot", "plan", "eval")


def _expand(args, fx: str) -> list[str]:
    args = [a.replace("{fx}", fx) for a in args]
    if args and args[0] in SUBCOMMANDS:
        return args
    return args + [o for o in SHORT if not any(a.startswith(o.split("=")[0] + "=") for a in args)]


# Not refusals, but each must not end in a traceback: a sweep asked for its config prints every job's config
# (or refuses in one line) and leaves nothing behind.
OTHER = {"multirun_cfg_job": ["-m", "optim.lr=1e-3,2e-3", "--cfg", "job"]}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    fx = str(tmp_path_factory.mktemp("fixtures"))
    _fixtures(fx)
    work = str(tmp_path_factory.mktemp("cases"))
    cases = []
    for p in CASES:
        case_id, args, _ = p.values
        env = {k: v.replace("{fx}", fx) for k, v in ENV.get(case_id, {}).items()}
        cases.append({"id": case_id, "argv": _expand(args, fx), "env": env,
                      "sys_path": [f"{fx}/site"] if case_id in SITE_CASES else [],
                      "timeout": 15 if p.marks else 90})  # a known failure is not waited for long
    cases += [{"id": case_id, "argv": args} for case_id, args in OTHER.items()]
    cases_path, out_path = os.path.join(work, "cases.json"), os.path.join(work, "results.json")
    with open(cases_path, "w") as f:
        json.dump(cases, f)
    env = {**os.environ, "AUTOMODEL_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": HERE}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "bad_input_runner.py"), cases_path, out_path, work],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out_path) as f:
        return {r["id"]: r for r in json.load(f)}


def test_catalogue_is_large_and_distinct():
    ids = [p.values[0] for p in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 60
    assert len({(tuple(p.values[1]), str(ENV.get(p.values[0]))) for p in CASES}) == len(CASES)


@pytest.mark.parametrize("case_id,args,phrases", CASES)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(results, case_id, args, phrases):
    r = results[case_id]
    shown = f"exit {r['code']}\nstdout: {r['stdout'][-1500:]}\nstderr: {r['stderr'][-3000:]}"
    assert "Traceback" not in r["stdout"] + r["stderr"], shown
    lines = [ln for ln in r["stderr"].splitlines() if ln.strip()]
    assert r["code"] == 2, shown
    assert len(lines) == 1 and lines[0].startswith(PREFIX), shown
    message = lines[0][len(PREFIX):]
    for phrase in phrases:
        assert phrase in message, (phrase, message)
    assert r["left_in_cwd"] == [], r["left_in_cwd"]
    assert not r["changed"], r["changed"]


def test_a_sweep_asked_for_its_config_prints_it_or_refuses_in_one_line(results):
    r = results["multirun_cfg_job"]
    shown = f"exit {r['code']}\nstdout: {r['stdout'][-1500:]}\nstderr: {r['stderr'][-3000:]}"
    assert "Traceback" not in r["stdout"] + r["stderr"], shown
    if r["code"] == 0:
        assert "lr: 0.001" in r["stdout"] and "lr: 0.002" in r["stdout"], shown
    else:
        lines = [ln for ln in r["stderr"].splitlines() if ln.strip()]
        assert r["code"] == 2 and len(lines) == 1 and lines[0].startswith(PREFIX), shown
    assert r["left_in_cwd"] == [], r["left_in_cwd"]


# ------------------------------------------------------------------ what used to be refused, and is not
def test_an_override_holding_a_tilde_parses_and_expands():
    """Hydra's grammar refuses `~` in an unquoted value; the CLI quotes it, and expands a leading one."""
    from automodel.compose import compose, expand_home

    home = os.path.expanduser("~")
    argv = ["data=instruction", "data.path=~/d.jsonl", "hydra.run.dir=~/runs/x", "-m", "data.val_path=/a~b.jsonl",
            "data.split=train", "'data.prompt_column=~q'"]
    assert expand_home(argv) == ["data=instruction", f"data.path='{home}/d.jsonl'", f"hydra.run.dir='{home}/runs/x'",
                                 "-m", "data.val_path='/a~b.jsonl'", "data.split=train", "'data.prompt_column=~q'"]
    cfg = compose(expand_home(["data=instruction", "data.path=~/d.jsonl", "data.val_path=/x/a~b.jsonl"]),
                  with_hydra=False)
    assert (cfg.data.path, cfg.data.val_path) == (f"{home}/d.jsonl", "/x/a~b.jsonl")
    assert expand_home(["data.path=~/a.jsonl,~/b.jsonl"]) == [f"data.path='{home}/a.jsonl','{home}/b.jsonl'"]


def test_a_target_module_written_as_a_string_is_the_one_module_it_names():
    """`peft.target_modules=q_proj` adapts q_proj (peft alone reads a string as a pattern of whole names, which
    matched nothing); a real pattern and all-linear keep peft's meaning."""
    from helpers import MICRO, compose

    from automodel.config import validate

    def adapted(*overrides):
        plugins = validate(compose(*MICRO, "peft=lora", *overrides)).plugins
        model = plugins["peft"].apply(plugins["model"].build("meta"))
        return sorted({n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_modules() if ".lora_A" in n})

    assert adapted("peft.target_modules=q_proj") == ["q_proj"] == adapted("peft.target_modules=[q_proj]")
    assert adapted("peft.target_modules=self_attn.v_proj") == ["v_proj"]
    assert adapted("peft.target_modules='.*\\.(k|o)_proj'") == ["k_proj", "o_proj"]
    assert adapted() == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]  # all-linear
