"""The peer library, perforatedai 3.2.9, set up once for every benchmark: non-interactive, GD dendrites.

Its settings live in a global configuration object; :func:`configure` sets the ones every benchmark needs (no
set-up screen, no ``pdb`` stop for unwrapped parameters, its gradient-descent dendrites rather than the licensed
correlation mode, no extra files or graphs, silent) and the few that differ per use. It is installed
``--no-deps`` by ``make test`` / ``make bench``; :func:`load` raises ImportError with the fix when it is absent.
"""

from __future__ import annotations

from typing import Optional, Sequence

__all__ = ["configure", "load"]


def load():
    """``(GPA, UPA)``: the peer's globals and utils modules."""
    try:
        from perforatedai import globals_perforatedai as GPA
        from perforatedai import utils_perforatedai as UPA
    except ImportError as exc:
        raise ImportError(f"perforatedai is not installed ({exc}); run make test or make bench to install it") from exc
    return GPA, UPA


def configure(
    module_names: Sequence[str] = (),
    module_ids: Optional[Sequence[str]] = None,
    switch: str = "history",
    patience: Optional[int] = None,
    max_dendrites: Optional[int] = None,
    max_tries: Optional[int] = None,
):
    """Set the peer's global configuration and return ``(GPA, UPA)``.

    Args:
        module_names: module class names to add dendrites to (``"Linear"``, ``"Conv2d"``...).
        module_ids: instead, the exact modules (``".path.to.module"``), e.g. only LoRA adapters.
        switch: ``"history"`` (add a set on a plateau of ``patience`` epochs), ``"every"`` (at every score) or
            ``"never"``.
        patience, max_dendrites, max_tries: the peer's ``n_epochs_to_switch``, ``max_dendrites`` and
            ``max_dendrite_tries`` (left at its defaults when None).
    """
    GPA, UPA = load()
    pc = GPA.pc
    pc.set_configuration_confirmed(True)  # no interactive set-up screen
    pc.set_testing_dendrite_capacity(False)  # not its "add a set every epoch" test mode
    pc.set_perforated_backpropagation(False)  # its GD dendrites (the correlation mode is licensed)
    pc.set_unwrapped_modules_confirmed(True)  # no pdb stop for parameters outside wrapped layers
    if module_ids is not None:
        pc.set_module_names_to_perforate([])
        pc.set_module_ids_to_perforate(list(module_ids))
    else:
        pc.set_module_names_to_perforate(list(module_names))
    modes = {"history": pc.DOING_HISTORY, "every": pc.DOING_SWITCH_EVERY_TIME, "never": pc.DOING_NO_SWITCH}
    pc.set_switch_mode(modes[switch])
    if patience is not None:
        pc.set_n_epochs_to_switch(patience)
    if max_dendrites is not None:
        pc.set_max_dendrites(max_dendrites)
    if max_tries is not None:
        pc.set_max_dendrite_tries(max_tries)
    pc.set_test_saves(False)
    pc.set_drawing_extra_graphs(False)
    pc.set_silent(True)
    return GPA, UPA
