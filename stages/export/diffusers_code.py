"""The custom-code files of a ``--format diffusers`` export, generated from this package's own networks.

Why: a diffusers user loads a model whose class diffusers does not ship through its documented
custom-code path, ``diffusers.AutoModel.from_pretrained(folder, trust_remote_code=True)``:
``config.json``'s ``auto_map`` names ``<module>.<class>``, diffusers copies that module file from
the folder (with the files it imports *relatively*) into its modules cache and imports the class,
a ``ModelMixin`` + ``ConfigMixin`` whose ``@register_to_config`` constructor takes the config's
keys. So the folder must carry the network code itself, and the consumer needs diffusers and torch,
not t2i-pipeline. To keep one source of truth, the files are written at export time from
``stages/nets/`` as they are (never a hand-kept copy): the modules the network's module imports,
each renamed ``t2i_<module>_<digest>.py`` with its ``from .x import`` lines pointing at the renamed
files, plus ``modeling_t2i.py`` with the wrapper class.

What diffusers 0.42 requires (diffusers/utils/dynamic_modules_utils.py), and how this meets it:

* every local custom-code file goes into one shared package, ``diffusers_modules.local``, and only
  the ``from .x import`` lines of the ``auto_map`` file itself are followed (not those of the files
  it imports): ``modeling_t2i.py`` imports every shipped module directly, and each module's name
  carries a digest of its text (which names its own imports' digests), so exports with different
  code never share a cached module in one process;
* the wrapper's constructor parameters must be named (diffusers matches config keys against the
  signature): they are the network config's fields with its defaults, plus ``t2i`` (role, flavor,
  conditioning widths, diffusion settings: what a sampler needs) and ``auto_map`` (else diffusers
  warns that config.json has a key the class does not expect), kept as registered config;
* the weights file is loaded into the wrapper by key: the wrapper *is* the network (it subclasses
  it and builds it in ``__init__``), so the keys are the run's own and the safetensors is copied
  byte for byte, and its ``forward`` is the network's;
* ``ModelMixin`` answers an attribute that is a config key with the config value before
  ``nn.Module`` finds a submodule of that name (GlideModel's ``text`` and ``unet`` are both): the
  wrapper's ``__getattr__`` asks ``nn.Module`` first.

The shipped modules may import only the standard library and torch (checked here, at export, so a
folder never fails at its user's import).
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib
import inspect
import re
import sys

MODELING_MODULE = "modeling_t2i"  # the auto_map module (a name with no dot: diffusers splits on it)
# network class -> (its module in stages/nets, its config dataclass)
NETWORKS = {"UNet": ("unet", "UNetConfig"), "PriorTransformer": ("prior_transformer", "PriorConfig"),
            "GlideModel": ("text_transformer", "GlideConfig"), "NoisedClip": ("clip_image_tower", "NoisedClipConfig")}
ALLOWED_IMPORTS = frozenset(sys.stdlib_module_names) | {"torch"}  # what a shipped network or sampling module may import
# The cascade pipeline file is a diffusers DiffusionPipeline: it may import diffusers (and PIL and
# numpy, which diffusers depends on) besides torch.
PIPELINE_MODULES = ("export.pipeline_t2i",)
PIPELINE_IMPORTS = ALLOWED_IMPORTS | {"diffusers", "PIL", "numpy"}
TRAINING_ONLY = ("gradient_checkpointing",)  # left at its default, as network_config() does


def class_name(network_class: str) -> str:
    """The diffusers class of an exported network: ``T2I`` + the network's class."""
    return f"T2I{network_class}"


def auto_map(network_class: str) -> dict[str, str]:
    return {"AutoModel": f"{MODELING_MODULE}.{class_name(network_class)}"}


def modeling_files(network_class: str) -> dict[str, str]:
    """``{file name: source}``: ``modeling_t2i.py`` and the network modules it imports."""
    if network_class not in NETWORKS:
        raise ValueError(f"no diffusers export for network class {network_class!r} "
                         f"(one of {', '.join(sorted(NETWORKS))})")
    stem, cfg_name = NETWORKS[network_class]
    files, renamed = ship(f"nets.{stem}")
    files[f"{MODELING_MODULE}.py"] = _wrapper(network_class, cfg_name, renamed)
    return files


def ship(*roots: str) -> tuple[dict[str, str], dict[str, str]]:
    """The modules ``roots`` (ids under ``stages``: ``nets.unet``, ``sampling.draw``) and every
    module of this package they import, as files to ship: ``({file name: source}, {module id:
    shipped module name})``, each file's imports of the others pointing at the shipped names."""
    renamed: dict[str, str] = {}   # module id -> shipped module name
    files: dict[str, str] = {}
    for mid in _closure(roots):    # dependencies first, so their names are known when rewritten
        text = _rewrite(mid, _source(mid), renamed)
        renamed[mid] = f"t2i_{mid.rsplit('.', 1)[-1]}_{hashlib.sha256(text.encode()).hexdigest()[:8]}"
        files[f"{renamed[mid]}.py"] = text
    return files, renamed


def import_all(renamed: dict[str, str], but: str | None = None) -> str:
    """Import lines naming every shipped module: diffusers copies only the files the loaded file
    imports relatively itself, not those its imports import."""
    return "".join(f"from .{name} import __name__ as _{name}  # noqa: F401\n"
                   for mid, name in renamed.items() if mid != but)


# ----------------------------------------------------------------------------- this package's source
def _path(mid: str) -> str:
    return f"stages/{mid.replace('.', '/')}.py"


def _source(mid: str) -> str:
    with open(importlib.import_module(f"stages.{mid}").__file__, encoding="utf-8") as f:
        return f.read()


def _imports(mid: str, text: str, allowed: frozenset[str] = ALLOWED_IMPORTS) -> list[str]:
    """The ids of this package's modules ``mid`` imports (``from .x import`` beside it, or
    ``from stages.x import``); anything else must be in ``allowed``."""
    package = mid.rsplit(".", 1)[0] + "." if "." in mid else ""
    deps = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and node.level:
            if node.level != 1 or not node.module:
                raise ValueError(f"{_path(mid)}: only 'from .module import ...' can be shipped in a "
                                 f"diffusers export (line {node.lineno})")
            deps.append(package + node.module)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stages."):
            deps.append(node.module.removeprefix("stages."))
        else:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) else [])
            bad = [n for n in names if n.split(".")[0] not in allowed]
            if bad:
                raise ValueError(f"{_path(mid)} imports {', '.join(bad)} (line {node.lineno}): a diffusers "
                                 "export ships this file, whose users have only diffusers and torch")
    return deps


def _closure(roots: tuple[str, ...]) -> list[str]:
    """``roots`` and every module of this package they import, dependencies before their importers."""
    order: list[str] = []

    def visit(mid: str, path: tuple[str, ...]) -> None:
        if mid in order:
            return
        if mid in path:
            raise ValueError(f"stages import cycle: {' -> '.join(path + (mid,))}")
        for dep in _imports(mid, _source(mid), PIPELINE_IMPORTS if mid in PIPELINE_MODULES else ALLOWED_IMPORTS):
            visit(dep, path + (mid,))
        order.append(mid)

    for root in roots:
        visit(root, ())
    return order


def _rewrite(mid: str, text: str, renamed: dict[str, str]) -> str:
    """``text`` with each import of this package's modules naming the shipped file."""
    package = mid.rsplit(".", 1)[0] + "." if "." in mid else ""

    def repl(m: re.Match) -> str:
        dep = package + m.group(3) if m.group(2) == "." else m.group(3)
        return f"{m.group(1)}.{renamed[dep]}{m.group(4)}" if dep in renamed else m.group(0)

    out = re.sub(r"^(\s*from\s+)(\.|stages\.)([\w.]+)(\s+import\b)", repl, text, flags=re.MULTILINE)
    allowed = PIPELINE_IMPORTS if mid in PIPELINE_MODULES else ALLOWED_IMPORTS
    left = [d for d in _imports(mid, out, allowed) if d.rsplit(".", 1)[-1] not in renamed.values()]
    if left:  # an import the pattern did not reach (e.g. split over lines): never ship a half-renamed file
        raise ValueError(f"{_path(mid)}: could not rename the imports of {left}")
    header = (f"# {_path(mid)} of t2i-pipeline, shipped with a diffusers export (imports of its modules renamed\n"
              f"# to the files beside it). Generated by stages/export/diffusers_code.py: re-export, do not edit.\n")
    return header + out


# ----------------------------------------------------------------------------- the wrapper class
def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        value = field.default
    else:  # default_factory: GlideConfig's nested text and unet configs, as the config.json spells them
        value = field.default_factory()
        if dataclasses.is_dataclass(value):
            value = {k: v for k, v in dataclasses.asdict(value).items() if k not in TRAINING_ONLY}
    if ast.literal_eval(repr(value)) != value:
        raise ValueError(f"{field.name}: default {value!r} has no literal form for the generated constructor")
    return value


def _wrapper(network_class: str, cfg_name: str, renamed: dict[str, str]) -> str:
    stem = NETWORKS[network_class][0]
    net_module = importlib.import_module(f"stages.nets.{stem}")
    cfg_cls = getattr(net_module, cfg_name)
    fields = [f for f in dataclasses.fields(cfg_cls) if f.name not in TRAINING_ONLY]
    params = "".join(f"        {f.name}={_default(f)!r},\n" for f in fields)
    cls = class_name(network_class)
    forward = str(inspect.signature(getattr(net_module, network_class).forward)).replace("(self, ", "(", 1)
    other = import_all(renamed, but=f"nets.{stem}")
    return f'''"""{cls}: t2i-pipeline's {network_class} (stages/nets/{stem}.py) as a diffusers model.

Generated by t2i-pipeline's ``t2i export --format diffusers`` from its own network code (the
t2i_*.py files beside this one): re-export rather than edit. Loading needs diffusers and torch only:

    from diffusers import AutoModel
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)

The model is the network itself: the same parameters and the same forward,

    model{forward}

``model.config`` holds its constructor arguments, and ``model.config.t2i`` the role, flavor,
conditioning widths and diffusion settings it was trained with.
"""
from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from .{renamed[f"nets.{stem}"]} import {network_class}, {cfg_name}
# diffusers copies only the files this one imports relatively: every shipped module is named here.
{other}

class {cls}({network_class}, ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
{params}        t2i=None,
        auto_map=None,
    ):
        # `t2i` (training metadata) and `auto_map` (how diffusers found this class) are config.json
        # keys, not network arguments. JSON has no tuples: tuple-typed fields get theirs back.
        args = {{k: tuple(v) if isinstance(v, list) else v
                for k, v in locals().items() if k not in ("self", "t2i", "auto_map")}}
        {network_class}.__init__(self, {cfg_name}(**args))

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        # diffusers leaves each tensor where safetensors put it, off the 64-byte boundary torch's
        # CPU allocator gives: MKL/oneDNN then sum in another order, a last-bit difference from the
        # run's own network (1/255 in a 128 px image). Fresh copies are aligned and compute the same.
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                t.data = t.data.clone()
        return model

    def __getattr__(self, name):
        # Parameters and submodules before diffusers' config attributes (GlideModel's `text` and
        # `unet` are both a submodule and a config key).
        try:
            return torch.nn.Module.__getattr__(self, name)
        except AttributeError:
            return ModelMixin.__getattr__(self, name)
'''
