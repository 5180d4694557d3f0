"""Shared defaults for every rmjax spec (not a spec itself: it has no get_config).

Why it exists: full.py, lora.py and demo.py differ in a handful of fields; everything else is
defined once here, with one comment per field, so the specs cannot drift apart. Spec files are
loaded by path (ml-collections' config_flags uses a SourceFileLoader, so `specs/` is not a
package): they load this file with `load_common()` below, copied into each of them, which
resolves it relative to their own __file__.

Every key of the spec contract is created here; a spec only changes values. Empty strings and
0 stand for "unset" (ml-collections cannot set a field back to None from the command line).
A key that a data module's dataclass defaults too takes its value from that module (the
reader options, the synthetic generator) or from `rmjax.data.defaults` (`D` below, for
RenderConfig and PipelineConfig), so a dataclass built without a spec means the same.
"""

import ml_collections

from rmjax.data import defaults as D  # the data keys' defaults RenderConfig and PipelineConfig share
from rmjax.data import synthetic
from rmjax.data.eqasc import EqascOptions
from rmjax.data.prm800k import DEFAULT_PHASE, Prm800kOptions
from rmjax.data.reveal import RevealOptions
from rmjax.model.cpu_dots import DEFAULT_CPU_DOT_LIBRARY


def base_spec() -> ml_collections.ConfigDict:
  """The full spec with the shared defaults (LoRA-independent values; mode left to the spec)."""
  c = ml_collections.ConfigDict()
  c.experiment_name = "rmjax"        # run name; run dir = <output_dir>/<experiment_name>
  c.output_dir = "runs"              # parent of run directories
  c.seed = 42                        # params init, dropout and data shuffling
  c.mode = "full"                    # "full" (every weight trains) | "lora" (adapters + head + marker row)
  c.lr = 2e-5                        # peak learning rate (AdamW)
  c.max_steps = 5000                 # optimizer steps (each = grad_accum_steps micro-batches)
  # GLOBAL examples per optimizer step, summed over micro-batches and devices. The seed used
  # 4 per device x 4 accumulation steps: 16 on one device; scale it with the device count
  # (e.g. 128 on 8 GPUs keeps 4 per device per micro-batch).
  c.batch_size = 16
  c.grad_accum_steps = 4             # micro-batches per step; micro-batch = batch_size // grad_accum_steps
  c.warmup_steps = 500               # linear warmup from 0 to lr
  c.schedule = "cosine"              # after warmup: "cosine" | "linear" (decay to 0) | "constant"
  c.weight_decay = 0.01              # AdamW decoupled weight decay
  c.max_grad_norm = 1.0              # global-norm gradient clipping; 0 = off
  c.opt_state_dtype = "float32"      # Adam moments mu/nu: float32 | bfloat16 (halves optimizer memory)
  c.loss = "mse"                     # on sigmoid(logit) vs target: "mse" | "bce"
  c.logging_steps = 10               # log train metrics every N steps
  c.eval_steps = 100                 # evaluate every N steps (and at the end); 0 = only at the end
  c.save_steps = 500                 # checkpoint every N steps (and at the end); 0 = only at the end
  c.max_eval_batches = D.MAX_EVAL_BATCHES  # eval batches per source per evaluation; 0 = the whole split
  c.init_from = ""                   # "" or a checkpoint dir: weights only, fresh optimizer and step 0
  c.nan_policy = "stop"              # non-finite loss: "stop" (raise, naming the step) | "skip" the update
  # Exit status after SIGTERM stopped the run (a checkpoint saved): 0, or non-zero (e.g. 143) so an
  # orchestrator sees an unfinished run and restarts it (launch/k8s-indexed-job.yaml sets 143).
  c.stop_exit_code = 0
  c.perf_metrics = False            # log where the loop's time goes: data wait, device idle, dispatch (a watcher thread)

  c.model = ml_collections.ConfigDict()
  c.model.path = "Qwen/Qwen3-4B-Instruct-2507"  # hub id, local HF dir, or "demo" (tiny random backbone)
  c.model.param_dtype = "float32"    # dtype of trained weights and optimizer moments
  c.model.compute_dtype = "bfloat16" # matmul/activation dtype ("float32" for CPU tests)
  c.model.frozen_dtype = "bfloat16"  # LoRA only: dtype the frozen base weights are stored in
  # remat and scan_unroll change speed and memory, never the numbers. "auto": before the first
  # step rmjax compiles the step under a few settings, fastest first, and takes the first that
  # fits the device (rmjax/train/auto_settings.py); logs/config.json records the choice.
  c.model.remat = "auto"             # rematerialisation per layer: "auto" | "none" | "full" | "dots_saveable" | ...
  c.model.scan_unroll = "auto"       # layers per iteration of the layer loop, as text: "auto" | "1" | ...;
                                     # "0" = no loop (on a GPU each layer's GEMMs read its weights in
                                     # place, not copies; longer compile)
  c.model.auto_time = False          # "auto": time one step of each candidate that fits and take the fastest
  c.model.attention_impl = ""        # "" = cuDNN on a GPU where it applies (bf16/fp16), else XLA | "xla" | "cudnn"
  c.model.attention_query_block = 128  # XLA attention (CPU; fp32 on a GPU): query rows per block, each
                                     # attending only the keys up to it (skips the upper half); 0 = one block
  c.model.cpu_dot_library = DEFAULT_CPU_DOT_LIBRARY  # "onednn" | "ynnpack" (XLA's default): the library a
                                     # CPU step's dots run in; same values to float rounding (model/cpu_dots.py)
  c.model.segment_attention = "auto" # packed rows under cuDNN: "mask" (segment mask) | "cudnn_packed" (each
                                     # example its own sequence, no work between examples; Hopper GPUs;
                                     # same values to bf16 rounding; speed: BUILD.md, Results)
                                     # | "auto" (cudnn_packed where it can run, else the mask)
  c.model.trust_remote_code = False  # passed to the HF tokenizer/config loaders
  c.model.demo = ml_collections.ConfigDict()  # backbone shape when model.path == "demo"
  c.model.demo.hidden_size = 64      # model width
  c.model.demo.num_layers = 2        # decoder layers
  c.model.demo.num_heads = 4         # query heads
  c.model.demo.num_kv_heads = 2      # key/value heads (grouped-query attention)
  c.model.demo.head_dim = 16         # per-head width
  c.model.demo.intermediate_size = 128  # MLP width
  c.model.demo.vocab_size = 0         # embedding rows; 0 = the demo tokenizer's; larger gives a real
                                     # model's embedding memory (e.g. 151936, Qwen3: benchmarks)

  c.head = ml_collections.ConfigDict()
  c.head.hidden_dims = (1024, 256)   # MLP hidden widths on the marker's hidden state
  c.head.activation = "gelu"         # "gelu" (exact erf, torch default) | "gelu_tanh" | "relu" | "silu" | "tanh"
  c.head.dropout = 0.1               # after each hidden layer, training only

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 16                   # adapter rank r (mode "lora")
  c.lora.alpha = 32.0                # scale = alpha / rank, as in PEFT
  c.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj")  # HF module names that get adapters

  c.data = ml_collections.ConfigDict()
  c.data.max_length = 2048           # tokens per example after truncation
  c.data.max_steps_per_example = D.MAX_STEPS_PER_EXAMPLE  # steps (markers) kept per example; later ones
                                     # are dropped (keep it above PRM800K's longest trajectories)
  c.data.length_buckets = (256, 512, 1024, 2048)  # rows pad to the smallest bucket that fits (few shapes, few compiles)
  c.data.template = D.TEMPLATE       # prompt rendering: "default" (plain text) | "chat" (tokenizer's chat template)
  c.data.neutral_target = Prm800kOptions.neutral_target  # target for neutral ratings (PRM800K rating 0)
  c.data.pack = D.PACK               # pack several examples per row (segment ids keep them apart)
  c.data.pack_lookahead = D.PACK_LOOKAHEAD  # packing: read on past this many examples that fit no row
  c.data.max_segments_per_row = D.MAX_SEGMENTS_PER_ROW  # packing: examples per row at most (cuDNN's packed
                                     # layout has this many slots); 0 = as many as its marker slots (4 x max_steps_per_example)
  c.data.eval_batch_size = D.EVAL_BATCH_SIZE  # global rows per eval batch
  c.data.num_workers = D.NUM_WORKERS  # grain read threads per source; 0 = read inline
  c.data.prefetch = D.PREFETCH       # examples buffered per source (grain ReadOptions.prefetch_buffer_size; <= 100000)
  c.data.allow_reveal_training = False  # REVEAL is eval-only unless set (its terms: test set only)

  c.data.synthetic = ml_collections.ConfigDict()  # SYNTHETIC PRM800K-format data, used when data.prm800k.path == ""
  generator = synthetic.SyntheticConfig()  # its defaults are the spec's
  c.data.synthetic.train_records = synthetic.DEFAULT_TRAIN_RECORDS  # records in <run_dir>/data/phase2_train.jsonl (written once, from seed)
  c.data.synthetic.test_records = synthetic.DEFAULT_TEST_RECORDS    # records in <run_dir>/data/phase2_test.jsonl
  c.data.synthetic.max_ops = generator.max_ops          # arithmetic operations per problem (2 to 100)
  c.data.synthetic.max_operand = generator.max_operand  # operands drawn from 1..max_operand (at most max_value)
  c.data.synthetic.max_value = generator.max_value      # running values stay in 0..max_value
  c.data.synthetic.max_offset = generator.max_offset    # a wrong step's result is off by 1..max_offset
  c.data.synthetic.error_rate = generator.error_rate    # fraction of records with a wrong step
  c.data.synthetic.step_padding = generator.step_padding  # text appended to every step: real-length steps for benchmarks

  c.data.prm800k = ml_collections.ConfigDict()
  c.data.prm800k.use = True          # train and evaluate on PRM800K
  c.data.prm800k.weight = 0.5        # sampling weight in the training mix
  c.data.prm800k.path = ""           # dir with phase{1,2}_{train,test}.jsonl; "" = synthetic PRM800K-format data
  c.data.prm800k.phase = DEFAULT_PHASE  # PRM800K release phase: 1 or 2 (phase 2 holds most labels)
  c.data.prm800k.train_split = "train"  # file split used for training
  c.data.prm800k.eval_split = "test"    # file split used for evaluation
  c.data.prm800k.drop_quality_control = Prm800kOptions.drop_quality_control  # drop records with is_quality_control_question
  c.data.prm800k.drop_screening = Prm800kOptions.drop_screening  # drop records with is_initial_screening_question

  c.data.eqasc = ml_collections.ConfigDict()
  c.data.eqasc.use = True            # train and evaluate on eQASC
  c.data.eqasc.weight = 0.25         # sampling weight in the training mix
  c.data.eqasc.path = ""             # dir with eqasc_{train,dev,test}_grc.json
  c.data.eqasc.train_split = "train" # file split used for training
  c.data.eqasc.eval_split = "dev"    # file split used for evaluation
  c.data.eqasc.label_all_steps = EqascOptions.label_all_steps  # chain label (turk_label) on every step, not only the conclusion

  c.data.reveal = ml_collections.ConfigDict()
  c.data.reveal.use = True           # evaluate on REVEAL (train only with allow_reveal_training)
  c.data.reveal.weight = 0.25        # sampling weight, used only with allow_reveal_training
  c.data.reveal.path = ""            # dir with eval/reveal_eval.csv (gated dataset, not shipped)
  c.data.reveal.eval_split = "eval"  # "eval" | "open"
  c.data.reveal.label = RevealOptions.label  # which REVEAL column is the step target

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                   # data-parallel axis; -1 = all remaining devices
  c.mesh.fsdp = 1                    # parameter-sharded data-parallel axis (batch splits over data*fsdp)
  c.mesh.tensor = 1                  # tensor-parallel axis (heads / MLP columns)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.max_to_keep = 3       # latest checkpoints kept (the best one is kept apart)
  c.checkpoint.keep_best = True      # also keep the step with the best eval loss
  c.checkpoint.async_save = True     # write in the background (waited for before exit)
  # On resume, a corrupt/truncated latest checkpoint is an error naming its path (default);
  # True = log it and resume from the newest older checkpoint that restores.
  c.checkpoint.fallback_to_previous = False

  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ""  # "host:port" of process 0; "" = from the environment (or one process)
  c.distributed.num_processes = 0    # 0 = from the environment
  c.distributed.process_id = -1      # -1 = from the environment
  return c


def source_block(reader: str, path: str = "", weight: float = 1.0, train_split: str = "train",
                 eval_split: str = "test", use: bool = True, test_only: bool = False,
                 **options) -> ml_collections.ConfigDict:
  """A data source of a supported format, for `c.data.<name> = source_block(...)`.

  A dataset is a spec entry, not code: any data.<name> block naming a `reader` is trained and
  evaluated like the built-in three (two blocks may share a reader). `options` are the reader's
  own keys (e.g. step_tag for math_shepherd); the rest:
  """
  c = ml_collections.ConfigDict()
  c.reader = reader                  # processbench | math_shepherd | stepwise | rmjax (or a built-in reader)
  c.use = use                        # train (weight > 0) and evaluate on it
  c.weight = float(weight)           # sampling weight in the training mix; 0 = evaluate only
  c.path = path                      # a file, a directory of <split>.{jsonl,json,parquet}, or hf://datasets/<owner>/<name>[/<file>]
  c.train_split = train_split        # split read for training (ignored when path is a file)
  c.eval_split = eval_split          # split read for evaluation (ignored when path is a file)
  c.test_only = test_only            # reported, never used to pick the best checkpoint (a benchmark)
  for key, value in options.items():
    c[key] = value
  return c
