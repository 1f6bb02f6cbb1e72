"""The split side of a :class:`~ase_bptt.data.db.TrajectoryDB`: assigning, declaring and reading splits.

The rules (hash of ``(seed, traj_id)``, hold-outs, declared splits) are
:mod:`ase_bptt.data.splits`; this mixin applies them to a database, each
call in one transaction that checks before it writes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from contextlib import AbstractContextManager
from fnmatch import fnmatchcase
from typing import Any, Protocol

from ase_bptt.data.db_types import TrajectoryDBError
from ase_bptt.data.splits import (
    SPLITS,
    HoldOut,
    HoldOutError,
    SplitFractions,
    TrajectoryInfo,
    check_split_fractions,
    hold_out_in_force,
    recorded_hold_out,
    split_changes,
    target_splits,
)

__all__ = ["SplitsMixin"]


class _Database(Protocol):
    """What the mixin uses of :class:`~ase_bptt.data.db.TrajectoryDB` (mypy's self-type for mixins)."""

    name: str
    _store: Any

    @property
    def _db(self) -> Any: ...
    @property
    def metadata(self) -> dict: ...
    def update_metadata(self, **values: Any) -> None: ...
    def transaction(self) -> AbstractContextManager[Any]: ...
    def _reading(self) -> AbstractContextManager[None]: ...
    def _key_value_pairs(self) -> list[tuple[int, dict]]: ...
    def read_records(
        self,
        split: str | None = None,
        converged_only: bool = True,
        *,
        final_only: bool = False,
        traj_ids: Sequence[str] | None = None,
    ) -> list[tuple[dict, list[dict]]]: ...
    def split_info(self) -> dict[str, TrajectoryInfo]: ...
    def declared(self) -> set[str]: ...
    def _final_rows_split(self) -> list[str | None]: ...


class SplitsMixin:
    """``assign_splits``, ``declare_split``, ``declared``, ``split_info`` of :class:`~ase_bptt.data.db.TrajectoryDB`."""

    def assign_splits(
        self: _Database,
        val: float = 0.1,
        test: float | None = None,
        seed: int = 0,
        *,
        hold_out: HoldOut | Sequence[HoldOut] | None = None,
        reassign: bool = False,
    ) -> dict[str, int]:
        """Give every trajectory a split ("train", "val" or "test").

        Always per trajectory, never per frame: frames of one relaxation are
        near-duplicates. The split is a function of ``(seed, traj_id)`` only
        (a hash mapped to [0, 1)), so it is deterministic and does not change
        when more trajectories are imported later. Trajectories that already
        have a split keep it unless ``reassign``. The settings are recorded in
        the metadata entry ``splits``, and a recorded hold-out stays in force:
        without ``reassign`` it joins ``hold_out`` (later trajectories that match
        it go to test).

        Args:
            val: expected fraction for validation.
            test: expected fraction for test; None: 0.1, or 0 with a ``hold_out``
                (test is then exactly the held-out group).
            seed: changes the assignment as a whole.
            hold_out: one :class:`HoldOut` or several (their union): the
                trajectories they match go to test, the others are split as above.
            reassign: recompute every split except the declared ones (see
                :meth:`declare_split`); forget the recorded hold-out.

        Returns:
            The number of trajectories per split after the call.

        Raises:
            HoldOutError: a hold-out value matches no trajectory, takes them
                all, or names trajectories that already have a train/val split
                (without ``reassign``, or declared); nothing is written then.
        """
        hold = hold_out_in_force(self.metadata, hold_out, reassign=reassign)
        test = (0.0 if hold else 0.1) if test is None else test
        check_split_fractions(val, test, train_left=False)
        with self.transaction():
            target = target_splits(
                self.split_info(), val, test, seed, reassign=reassign, hold_out=hold, declared=self.declared()
            )
            self._store.set_splits(split_changes(self._key_value_pairs(), target))
            held = [h.to_dict() for h in hold]
            self.update_metadata(splits={"val": val, "test": test, "seed": seed, "hold_out": held})
        counts = Counter(s for s in (self._final_rows_split()))
        return {s: counts.get(s, 0) for s in SPLITS}

    def declare_split(
        self: _Database, split: str, *, traj_ids: Sequence[str] = (), sources: Sequence[str] = ()
    ) -> list[str]:
        """Give trajectories the split the user names, e.g. a fixed test set (one transaction).

        A declared split is a fact about the data, as a separate test file is
        for MACE: :meth:`assign_splits` keeps it even with ``reassign``; declare
        it again to move it.

        Args:
            split: "train", "val" or "test".
            traj_ids: shell patterns (:func:`fnmatch.fnmatchcase`) matched
                against the traj_ids.
            sources: shell patterns matched against the recorded sources (the
                imported file as it was named, e.g. ``'paper/*'``).

        Returns:
            The traj_ids given the split.

        Raises:
            TrajectoryDBError: a pattern matches no trajectory.
            HoldOutError: ``split`` is train or val for a trajectory the
                recorded hold-out sends to test; nothing is written then.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        with self.transaction():
            info = self.split_info()
            sources_of = {
                m["traj_id"]: m["source"] or "" for m, _ in self.read_records(converged_only=False, final_only=True)
            }
            chosen: set[str] = set()
            for patterns, field_of in ((traj_ids, lambda t: t), (sources, sources_of.get)):
                for pattern in patterns:
                    found = {t for t in info if fnmatchcase(field_of(t) or "", pattern)}
                    if not found:
                        raise TrajectoryDBError(f"{pattern!r} matches no trajectory of {self.name}")
                    chosen |= found
            hold = recorded_hold_out(self.metadata)
            held = [t for t in sorted(chosen) if any(h.matches(info[t][0], info[t][2]) for h in hold)]
            if held and split != "test":
                names = "; ".join(map(str, hold))
                raise HoldOutError(
                    f"{len(held)} of these trajectories (e.g. {held[0]}) are held out in test by the recorded "
                    f"hold-out ({names}), so they cannot be {split}; reassign the hold-out first "
                    "(ase-bptt split DB --reassign ...)"
                )
            rows = [(i, split) for i, kvp in self._key_value_pairs() if kvp["traj_id"] in chosen]
            self._store.set_splits(rows, declared=True)
        return sorted(chosen)

    def check_new_splits(
        self: _Database, new: dict[str, TrajectoryInfo], splits: SplitFractions | None, *, declared: bool
    ) -> None:
        """Before trajectories are added: raise HoldOutError if the splits asked for them cannot be kept.

        Args:
            new: ``{traj_id: (label, split or None, elements)}`` of the trajectories to add.
            splits: the fractions and hold-out :meth:`assign_splits` will then apply, or None.
            declared: the new trajectories' splits are the user's (``import --split``).
        """
        if splits is None and not declared:
            return
        hold = hold_out_in_force(self.metadata, splits.hold_out if splits is not None else (), reassign=False)
        if splits is None and not hold:
            return
        info = {**self.split_info(), **new}
        fixed = self.declared() | (set(new) if declared else set())
        fractions = splits if splits is not None else SplitFractions(val=0, test=0)
        target_splits(
            info, fractions.val, fractions.test, fractions.seed, reassign=False, hold_out=hold, declared=fixed
        )

    def declared(self: _Database) -> set[str]:
        """The traj_ids whose split the user declared (:meth:`declare_split`, ``import --split``)."""
        with self._reading():
            return {r.traj_id for r in self._db.select(is_final=True, split_declared=True, include_data=False)}

    def split_info(self: _Database) -> dict[str, TrajectoryInfo]:
        """``{traj_id: (label, split, elements)}`` of every trajectory (one query)."""
        with self._reading():
            rows = self._db.select(is_final=True, include_data=False)
            return {r.traj_id: (r.get("label"), r.get("split"), frozenset(r.symbols)) for r in rows}

    def _final_rows_split(self: _Database) -> list[str | None]:
        with self._reading():
            return [row.get("split") for row in self._db.select(is_final=True, include_data=False)]
