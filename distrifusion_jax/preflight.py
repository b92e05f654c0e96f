"""Checks that need no weights, run before anything slow (weight loading, compilation): each a one-line error."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .cache import check_cache_dir
from .config import DistriConfig, read_json
from .decode import check_tiles, check_tiles_apply
from .distributed import devices as jax_devices
from .errors import CheckpointError, ConfigError, show
from .models.unet import UNetConfig
from .schedulers import make_scheduler, scheduler_from_config
from .tokenizer import load_tokenizer
from .weights.pipeline_weights import TOKENIZER_OF, listed_encoders, pipeline_components
from .weights.single_file import FAMILY_LAYOUTS, PIPELINE_OF, cached_pipeline, is_single_file

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
STEP_SEARCH = 64  # how far below a refused step count to look for one the scheduler supports
# models inside the package, by name: the demo model trained by tools/train_demo.py (docs/demo-model.md)
BUNDLED = {"demo": Path(__file__).parent / "demo"}


# ---- the model folder ----
def resolve_model_path(path_or_hub_id, cache=None, layouts=None, single_file_config=None) -> Path:
    """A local pipeline folder, a single-file SDXL checkpoint (`.safetensors` in the original layout: converted
    once into a folder under the cache folder `cache`, see `single_file.cached_pipeline`, whose header checks
    run first), a bundled model's name ("demo", where no folder of that name is in the working directory), or
    a hub id looked up in huggingface_hub's local cache (then the network). `single_file_config` names the bundled
    config a single file was trained with (default: detected from its keys); refused for anything else."""
    path = Path(os.fspath(path_or_hub_id)).expanduser()
    if single_file_config is not None and not is_single_file(path):
        raise ConfigError(
            f"single_file_config={single_file_config!r} applies to single-file checkpoints (.safetensors in the "
            f"original layout) only; {path_or_hub_id} is not one: leave it out"
        )
    if path.is_dir():
        return path
    if is_single_file(path):
        return cached_pipeline(path, single_file_config, cache=cache, layouts=layouts)
    name = str(path_or_hub_id)
    if name in BUNDLED:
        if not (BUNDLED[name] / "model_index.json").is_file():
            raise CheckpointError(
                f"the bundled {name} model is missing from {BUNDLED[name]}: reinstall distrifusion-jax"
            )
        return BUNDLED[name]
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointError(
            f"model folder {name} does not exist (and it is not a hub id like "
            "'stabilityai/stable-diffusion-xl-base-1.0')"
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - transformers brings huggingface_hub
        raise CheckpointError(f"{name} is not a local folder and huggingface_hub is not installed") from None
    patterns = ["*.json", "*.txt", "*.safetensors", "*.model"]
    try:
        return Path(snapshot_download(name, local_files_only=True, allow_patterns=patterns))
    except Exception:  # noqa: BLE001 - not cached: try the network unless told not to
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise CheckpointError(
                f"{name} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                f"download it first (huggingface-cli download {name}) or pass a folder"
            ) from None
    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"{name} is not in the local Hugging Face cache and could not be downloaded "
            f"({type(e).__name__}); download it where the network is reachable or pass a "
            "local folder"
        ) from None


@dataclasses.dataclass(frozen=True)
class ModelFiles:
    """A pipeline folder's configuration files, read and checked: everything known before a weight is read."""

    root: Path
    index: dict
    unet: UNetConfig
    vae: dict
    scheduler: dict
    tokenizers: Any  # one per text encoder, validated against its vocabulary
    encoders: tuple = ("text_encoder", "text_encoder_2")  # the text encoders' folders, in the order used

    @property
    def family(self) -> str:
        """ "sdxl" (a UNet with SDXL's text_time micro-conditioning: base or refiner) or "sd" (SD 1.x / 2.x)."""
        return "sdxl" if self.unet.addition_embed_type == "text_time" else "sd"

    @property
    def aesthetic(self) -> bool:
        """Whether the UNet's time ids carry an aesthetic score instead of the target size (SDXL's refiner)."""
        return bool(self.index.get("requires_aesthetics_score", False))

    @property
    def native_size(self) -> int:
        """The image size the model was trained at: its VAE's sample_size (1024 for SDXL, 256 for the demo)."""
        return int(self.vae.get("sample_size", 1024))


def read_json_file(root: Path, rel: str) -> dict:
    """`root/rel` as a JSON object; CheckpointError if missing or unreadable, ConfigError if not valid JSON."""
    path = root / rel
    if not path.is_file():
        raise CheckpointError(
            f"{root}: no {rel}; this is not a complete SDXL pipeline folder: download or "
            "convert it again (distrifusion-jax convert)"
        )
    try:
        return read_json(path)
    except ConfigError as e:
        raise ConfigError(f"{e}; repair the file, or download or convert the model again") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"cannot read {path} ({getattr(e, 'strerror', None) or e}); check its permissions, "
            "or download or convert the model again"
        ) from None


def read_model(root: Path) -> ModelFiles:
    """The configuration files of the pipeline folder `root` (already resolved from a hub id): SDXL (base or
    refiner) or SD 1.x / 2.x, told apart by the UNet's micro-conditioning."""
    if not (root / "model_index.json").is_file():
        raise CheckpointError(
            f"{root}: no model_index.json; pass a pipeline folder (SDXL: unet/, vae/, text_encoder/, "
            "text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/; SD 1.x / 2.x: one text encoder and tokenizer)"
        )
    index = read_json_file(root, "model_index.json")
    unet_dir_missing = not (root / "unet").is_dir()
    unet = None if unet_dir_missing else UNetConfig.from_dict(read_json_file(root, "unet/config.json"))
    sdxl = unet is None or unet.addition_embed_type == "text_time"
    encoders, wanted = listed_encoders(index, sdxl), pipeline_components(index, sdxl)
    missing = [c for c in COMPONENTS if c in wanted and not (root / c).is_dir()]
    if missing:
        kind = "an SDXL" if sdxl else "a Stable Diffusion"
        raise CheckpointError(
            f"{root}: missing component folder(s) {', '.join(missing)} of {kind} pipeline; "
            "download or convert the whole pipeline again"
        )
    tokenizers = [
        load_tokenizer(
            root / TOKENIZER_OF[encoder],
            vocab_size=read_json_file(root, f"{encoder}/config.json").get("vocab_size"),
            what=TOKENIZER_OF[encoder],
        )
        for encoder in encoders
    ]
    return ModelFiles(
        root,
        index,
        unet,
        read_json_file(root, "vae/config.json"),
        read_json_file(root, "scheduler/scheduler_config.json"),
        tokenizers,
        encoders,
    )


# ---- layout, scheduler, kernels ----
def check_layout(distri_config: DistriConfig, unet_config: UNetConfig, n_devices: int) -> None:
    """Whether the size and device count fit the UNet in a layout a call may use (`from_pretrained`).

    The guidance scale, hence the CFG split, is known only at the call (guidance <= 1 runs without
    it): a config that fits without the split is accepted here, and a call that needs the split
    after all fails then, before compiling.
    """
    layouts = [distri_config]
    if distri_config.do_classifier_free_guidance and distri_config.split_batch:
        layouts.append(dataclasses.replace(distri_config, do_classifier_free_guidance=False))
    errors = []
    for config in layouts:
        try:
            config.check_model(unet_config, n_devices)
            return
        except ConfigError as e:
            errors.append(e)
    raise errors[0]  # the layout as configured (with the CFG split): what the default guidance uses


def make_scheduler_of(files: ModelFiles, name=None):
    """The scheduler a run will use: `name` configured from the folder's config, else the config's own class."""
    return make_scheduler(name, files.scheduler) if name else scheduler_from_config(files.scheduler)


def check_schedule(sched, num_inference_steps) -> int:
    """The number of steps, if the scheduler's config gives that many distinct in-range timesteps.

    `check_steps` bounds it by num_train_timesteps, but some configs fail below that: DDIM's "leading"
    spacing with steps_offset=1 indexes timestep 1000 at 1000 steps, DPM-Solver's repeats one
    timestep at 1000 (diffusers behaves the same). Tracing `init` abstractly finds the first
    without any device work.
    """
    n = sched.check_steps(num_inference_steps)
    where = (
        f"num_inference_steps={n} does not fit the {sched.name} scheduler's config (timestep_spacing="
        f"{sched.timestep_spacing!r}, steps_offset={sched.steps_offset}, num_train_timesteps="
        f"{sched.num_train_timesteps})"
    )
    try:
        ts = np.asarray(sched.timesteps(n))
        jax.eval_shape(lambda x: sched.init(n, x), jax.ShapeDtypeStruct((1, 8, 8, 4), jnp.float32))
    except IndexError:
        raise ConfigError(
            f"{where}: its timesteps run past the last training timestep; use fewer steps"
        ) from None
    if len(np.unique(ts)) != len(ts):
        raise ConfigError(
            f"{where}: its {len(ts)} timesteps repeat ({len(np.unique(ts))} distinct); use fewer steps"
        ) from None
    return n


def _steps_fit(scheduler, n: int) -> bool:
    """Whether the pipeline accepts `n` steps of this scheduler (distinct timesteps it can index)."""
    try:
        check_schedule(scheduler, n)
    except ConfigError:
        return False
    return True


def check_steps(scheduler, steps: int, name: str = "num_inference_steps") -> None:
    """ConfigError unless the scheduler turns `steps` into as many distinct timesteps, naming the most it takes.

    The limit is num_train_timesteps or a little less, depending on the config: with SDXL's (1000
    timesteps, "leading" spacing, steps_offset 1) Euler takes 1000 steps, DDIM 999 (at 1000 it would
    index timestep 1000) and DPM-Solver 999 (at 1000 a timestep repeats).
    """
    if steps < 1:
        raise ConfigError(f"{show(name, steps)}: need at least one step (e.g. 30)")
    if _steps_fit(scheduler, steps):
        return
    top = min(steps - 1, scheduler.num_train_timesteps)
    best = next((n for n in range(top, max(0, top - STEP_SEARCH), -1) if _steps_fit(scheduler, n)), None)
    what = (
        f"the {scheduler.name} scheduler ({scheduler.num_train_timesteps} training timesteps, timestep_spacing "
        f"{scheduler.timestep_spacing!r}, steps_offset {scheduler.steps_offset})"
    )
    fix = (
        f"takes at most {best} steps; use {best} or fewer"
        if best
        else f"does not take {steps} steps; use fewer"
    )
    raise ConfigError(f"{show(name, steps)}: {what} {fix}")


def check_attention(impl, platform: str, name: str = "attention_impl") -> None:
    """cuDNN attention exists only on NVIDIA GPUs: refuse it elsewhere before anything is loaded."""
    if impl == "cudnn" and platform != "gpu":
        raise ConfigError(
            f"{show(name, impl)} needs an NVIDIA GPU (cuDNN) but this run is on {platform}; use "
            "'xla', 'chunked' or 'auto' instead (or leave it unset)"
        )


# ---- everything from_pretrained can check ----
def check_distri_config(distri_config) -> DistriConfig:
    """`distri_config`, or the default for None; ConfigError for anything else (a dict, a size)."""
    if distri_config is None:
        return DistriConfig()
    if not isinstance(distri_config, DistriConfig):
        raise ConfigError(
            f"distri_config={distri_config!r} is a {type(distri_config).__name__}, not a DistriConfig: "
            "pass DistriConfig(height=..., width=..., devices=...), or None for the defaults"
        )
    return distri_config


def check_family(files: ModelFiles, family) -> None:
    """A folder of the other family than the pipeline class runs: one line naming the class that loads it."""
    if family is not None and files.family != family:
        what = "a Stable Diffusion 1.x / 2.x" if files.family == "sd" else "an SDXL"
        raise ConfigError(
            f"{files.root} holds {what} pipeline: load it with {PIPELINE_OF[files.family]}.from_pretrained (or "
            "DistriPipeline.from_pretrained, which picks the class)"
        )


def check_pretrained(
    path_or_hub_id,
    distri_config=None,
    scheduler=None,
    attention_impl=None,
    vae_attention_impl=None,
    compilation_cache=None,
    parallel_decode: bool = True,
    decode_tile_rows=None,
    family=None,
    single_file_config=None,
) -> tuple[ModelFiles, DistriConfig]:
    """What `from_pretrained` checks before reading a weight: (the folder's configuration files, the config).
    `family`: "sdxl" or "sd" for a pipeline class that runs only those (a single file of the other layout is
    refused from its header, before any conversion); None: any."""
    distri_config = check_distri_config(distri_config)
    check_tiles(decode_tile_rows, name="decode_tile_rows")
    check_cache_dir(compilation_cache)
    layouts = FAMILY_LAYOUTS.get(family)
    files = read_model(resolve_model_path(path_or_hub_id, compilation_cache, layouts, single_file_config))
    check_family(files, family)
    jax_devices()  # a platform JAX cannot start fails here in one line
    devices = distri_config.resolve_devices()
    check_layout(distri_config, files.unet, len(devices))
    check_tiles_apply(decode_tile_rows, len(devices) if parallel_decode else 1, distri_config.latent_height)
    check_attention(attention_impl, devices[0].platform, "attention_impl")
    check_attention(vae_attention_impl, devices[0].platform, "vae_attention_impl")
    make_scheduler_of(files, scheduler)  # an unknown scheduler name or class
    return files, distri_config
