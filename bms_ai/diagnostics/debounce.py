"""Vectorised debounce / hysteresis / latch state for k tiers x n elements.

A tick with nothing pending, active or violating costs nothing (callers test
that on scalars first); a tick that repeats a settled state (the same elements
violating, all of them active with full counts; nothing unlatched back
inside, as while a fault is held or a latched fault waits for its reset)
costs a few array ops; with a few elements in play the tick runs element by
element; otherwise one array op covers all 96 cells and all tiers. All four
give the same state. The set side is an up/down counter like
the foxBMS DIAG module (a violating tick counts up, a good tick counts down),
which tolerates a single noisy sample without letting a chattering signal
hide a real violation; the clear side needs ``clear_count`` consecutive ticks
inside the limit by the hysteresis margin, so a value hovering at the
threshold cannot toggle the event.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Transition:
    """Elements whose state changed in this tick, as (tier, index) arrays."""

    set_tier: np.ndarray
    set_index: np.ndarray
    clear_tier: np.ndarray
    clear_index: np.ndarray

    @property
    def any(self) -> bool:
        """Whether anything was set or cleared (most ticks: nothing)."""
        return bool(self.set_tier.size or self.clear_tier.size)


_E = np.empty(0, dtype=np.int64)
_EMPTY = Transition(_E, _E, _E, _E)
#: with at most this many elements in play (pending, active or violating), a tick runs element by element
#: in plain Python: a latched fault or a held warning on one cell then costs microseconds, not 25 array ops
FEW = 8


class Debouncer:
    """k tiers x n elements; ``latch[k]`` tiers stay active until :meth:`reset`."""

    def __init__(self, n: int, set_counts: tuple[int, ...], clear_count: int,
                 latch: tuple[bool, ...] | None = None) -> None:
        k = len(set_counts)
        self.n, self.k = n, k
        self.set_n = np.asarray(set_counts, dtype=np.int32).reshape(k, 1)
        self.clear_n = int(clear_count)
        self.latch = np.asarray(latch if latch is not None else (False,) * k, dtype=bool).reshape(k, 1)
        self._unlatched = ~self.latch
        self.count = np.zeros((k, n), dtype=np.int32)
        self.clear = np.zeros((k, n), dtype=np.int32)
        self.active = np.zeros((k, n), dtype=bool)
        self.onset = np.full((k, n), np.nan)     # first violating tick of the current episode
        self.set_time = np.full((k, n), np.nan)  # tick at which the debounce completed
        # nothing pending, nothing active: a tick without a violation changes nothing (callers may skip it);
        # a plain attribute, as every check reads it every tick
        self.idle = True
        self.generation = 0  # counts sets, clears and resets: between two, the active elements are unchanged
        # flat indices of the elements pending or active (None: not known, recomputed when needed)
        self._hot: list[int] | None = []
        self._set_list = [int(x) for x in set_counts]
        self._latch_list = [bool(x) for x in self.latch[:, 0]]
        self._few_ok = all(x >= 1 for x in self._set_list)  # the per-element path assumes counts in 0..set_n
        # the violating elements of a settled state (see _settled), None when the state is not settled
        self._settled_viol: np.ndarray | None = None
        self._scratch = np.empty((k, n), dtype=bool)
        self._all_unlatched = not self.latch.any()

    def any_active(self, first_tier: int = 0) -> bool:
        """Whether an element is active in ``first_tier`` or a higher tier."""
        return not self.idle and bool(np.count_nonzero(self.active[first_tier:]))

    def update(self, violating: np.ndarray, inside: np.ndarray, t: float) -> Transition:
        """violating: value beyond the limit; inside: value back inside by the hysteresis.

        Where neither holds (in the hysteresis band, or NaN) counters hold.
        """
        if self.idle and not np.count_nonzero(violating):
            return _EMPTY  # the common case: nothing pending, nothing active, nothing violating
        if self._settled_viol is not None and self._hold(violating, inside):
            return _EMPTY  # a held violation or latched fault: the same elements violating, nothing can clear
        self._settled_viol = None
        tr = None
        if self._few_ok and violating.shape == inside.shape == self.count.shape:
            tr = self._update_few(violating, inside, t)
        if tr is None:
            tr = self._update_all(violating, inside, t)
        if tr is _EMPTY and not self.idle:
            self._settled_viol = self._settled(violating)
        return tr

    def _update_all(self, violating: np.ndarray, inside: np.ndarray, t: float) -> Transition:
        """:meth:`update` as array ops over every tier and element."""
        self._hot = None
        c, active = self.count, self.active
        inactive = ~active  # before this tick's sets: started, idle and new all look at it
        started = violating & (c == 0) & inactive
        c += violating
        c -= ~violating & (c > 0)
        np.minimum(c, self.set_n, out=c)
        self.onset[started] = t
        self.onset[(c == 0) & inactive] = np.nan  # idle again: the episode is over
        new = inactive & (c >= self.set_n)
        active |= new
        self.set_time[new] = t
        held = active & inside
        cl = self.clear
        cl += held
        cl *= held  # consecutive ticks inside, 0 otherwise
        cleared = active & (cl >= self.clear_n) & self._unlatched
        any_cleared = bool(np.count_nonzero(cleared))  # count_nonzero: the cheapest any() numpy has
        if any_cleared:
            self._clear(cleared)
        self.idle = not (np.count_nonzero(c) or np.count_nonzero(active))
        if not (any_cleared or np.count_nonzero(new)):
            return _EMPTY
        self.generation += 1
        st, si = np.nonzero(new)
        ct, ci = np.nonzero(cleared)
        return Transition(st, si, ct, ci)

    def _settled(self, violating: np.ndarray) -> np.ndarray | None:
        """A copy of ``violating`` if repeating it can only move clear counters of latched tiers, else None.

        That holds when every violating element is active with its count at the
        set count, every other count is 0 and no clear counter of an unlatched
        tier runs: the counts then stay (saturated or 0), no episode starts or
        ends (onsets of idle elements are already NaN) and nothing new is set.
        While no element of an unlatched tier is back inside, nothing clears:
        only the clear counters of latched tiers move (see :meth:`_hold`).
        """
        if not (self._few_ok and self.clear_n >= 1) or violating.shape != self.count.shape or \
                np.count_nonzero(violating & ~self.active):
            return None
        if np.count_nonzero(self.count != self.set_n * violating) or np.count_nonzero(self.clear * self._unlatched):
            return None
        return violating.copy()

    def _hold(self, violating: np.ndarray, inside: np.ndarray) -> bool:
        """A tick that repeats the settled violation with no unlatched active element inside: apply it, True.

        Such a tick moves only the clear counters (of latched tiers, which never
        clear by themselves); False, changing nothing, for any other tick.
        """
        settled, held = self._settled_viol, self._scratch
        if violating.shape != settled.shape or inside.shape != settled.shape:
            return False
        np.not_equal(violating, settled, out=held)
        if np.count_nonzero(held):
            return False
        np.logical_and(self.active, inside, out=held)
        if not np.count_nonzero(held):
            self.clear.fill(0)  # nothing inside: every run of ticks inside ends
            return True
        if self._all_unlatched or np.count_nonzero(held & self._unlatched):
            return False
        cl = self.clear
        cl += held
        cl *= held  # consecutive ticks inside, 0 otherwise (as in _update_all)
        return True

    def _update_few(self, violating: np.ndarray, inside: np.ndarray, t: float) -> Transition | None:
        """:meth:`update` element by element when few are in play; None (nothing changed) when too many are.

        Elements neither pending, active nor violating are left alone: for them the
        array update changes nothing (count and clear counter stay 0, onset NaN).
        """
        viol_idx = np.flatnonzero(violating)
        hot = self._hot if self._hot is not None else np.flatnonzero(self.count | self.active).tolist()
        if viol_idx.size + len(hot) > FEW:
            return None
        cand = sorted(set(hot).union(viol_idx.tolist()))  # row-major order, as np.nonzero reports
        vf, inf = violating.reshape(-1), inside.reshape(-1)
        cf, clf, af = self.count.reshape(-1), self.clear.reshape(-1), self.active.reshape(-1)
        onset, set_time = self.onset.reshape(-1), self.set_time.reshape(-1)
        new: list[int] = []
        cleared: list[int] = []
        for f in cand:
            tier = f // self.n
            viol, was_active, c = bool(vf[f]), bool(af[f]), int(cf[f])
            if viol and c == 0 and not was_active:
                onset[f] = t                          # the episode starts
            c = min(c + 1 if viol else (c - 1 if c > 0 else c), self._set_list[tier])
            if c == 0 and not was_active:
                onset[f] = np.nan                     # idle again: the episode is over
            active = was_active
            if not was_active and c >= self._set_list[tier]:
                active = True
                set_time[f] = t
                new.append(f)
            cl = int(clf[f]) + 1 if active and bool(inf[f]) else 0
            if active and cl >= self.clear_n and not self._latch_list[tier]:
                active, c, cl = False, 0, 0
                onset[f] = set_time[f] = np.nan
                cleared.append(f)
            cf[f], clf[f], af[f] = c, cl, active
        self._hot = [f for f in cand if cf[f] or af[f]]
        self.idle = not self._hot
        if not (new or cleared):
            return _EMPTY
        self.generation += 1
        n = self.n
        return Transition(np.array([f // n for f in new], dtype=np.intp), np.array([f % n for f in new], dtype=np.intp),
                          np.array([f // n for f in cleared], dtype=np.intp),
                          np.array([f % n for f in cleared], dtype=np.intp))

    def _clear(self, mask: np.ndarray) -> None:
        self.active[mask] = False
        self.count[mask] = 0
        self.clear[mask] = 0
        self.onset[mask] = np.nan
        self.set_time[mask] = np.nan

    def reset(self) -> Transition:
        """Acknowledge latched events: everything active clears (re-sets after debounce if still violating)."""
        mask = self.active.copy()
        self._clear(mask)
        self._hot = None
        self._settled_viol = None
        self.generation += 1
        self.idle = not self.count.any()
        ct, ci = np.nonzero(mask)
        e = np.empty(0, dtype=np.int64)
        return Transition(e, e, ct, ci)

    def top_tier(self) -> int:
        """Highest active tier index, -1 if none."""
        if self.idle:
            return -1
        for k in range(self.k - 1, -1, -1):
            if np.count_nonzero(self.active[k]):
                return k
        return -1
