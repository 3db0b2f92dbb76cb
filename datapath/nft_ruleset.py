"""An nf_tables ruleset frozen in place: snapshot it, compare, revert any change.

iptables-nft, ip6tables-nft and native nft all write the kernel's nf_tables, so
one snapshot of ``nft -j list ruleset`` covers them. A snapshot keys every
object by what it is (family, table, kind, name), and keeps each chain's rules
in order, without the handles and counter values that change by themselves.
Two snapshots are equal when the rulesets filter the same way.

`revert_plan(current, baseline)` is the nft script, one transaction, that takes
the ruleset from `current` back to `baseline`:

- a table that is new is deleted, with all it holds;
- a table whose baseline objects are all unchanged and whose baseline rules
  are all still there, in order, loses just what was added: rules by handle
  (inserts, appends, replacements), then new chains (flushed first, since a
  chain with rules cannot go), sets, maps and other named objects;
- any other change to a table (a policy, a removed or flushed rule, a changed
  set, a deleted chain) recreates the table from its baseline text, which
  ``nft list table`` printed when the baseline was taken; a table deleted
  altogether is recreated the same way. An iptables-nft table whose rules use
  extensions nft cannot write back (``xt match ...``) is recreated from
  ``iptables-nft-save`` with ``iptables-nft-restore`` instead.

Each table is reverted by a transaction of its own, so a table that cannot be
reverted (one created with ``flags owner`` belongs to its creator's socket)
holds back only itself.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field

from netns_lab import netns

# Named objects a table can hold (``nft -j`` keys), and how nft deletes each.
DELETABLE = {"chain": "chain", "set": "set", "map": "map", "flowtable": "flowtable",
             "counter": "counter", "quota": "quota", "limit": "limit", "secmark": "secmark",
             "synproxy": "synproxy", "ct helper": "ct helper", "ct timeout": "ct timeout",
             "ct expectation": "ct expectation"}


# Tables iptables-nft creates in nf_tables: iptables-nft-save lists their rules, and
# iptables-nft-restore can write them back whole.
XTABLES = {"filter", "nat", "mangle", "raw", "security"}
XT_RESTORE = {"ip": "iptables-nft-restore", "ip6": "ip6tables-nft-restore"}
XT_SAVE = {"ip": "iptables-nft-save", "ip6": "ip6tables-nft-save"}
# what `nft list` prints for an expression of an iptables extension it cannot translate
_XT_COMPAT = re.compile(r"\bxt (match|target|watcher) ")
UNREADABLE = "unreadable"       # the canonical form of a table nft cannot print as JSON


class NftError(RuntimeError):
    """nft could not list the ruleset."""


def _normal(value):
    """A JSON value without what changes on its own: handles and counter figures."""
    if isinstance(value, dict):
        return {k: ({} if k == "counter" and isinstance(v, dict) and "packets" in v
                    else _normal(v))
                for k, v in value.items() if k != "handle"}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    return value


def _canon(value) -> str:
    return json.dumps(_normal(value), sort_keys=True)


TableKey = tuple[str, str]                  # family, table


@dataclass
class Snapshot:
    # (family, table, kind, name) -> canonical JSON; kind "table" has name ""
    objects: dict[tuple[str, str, str, str], str] = field(default_factory=dict)
    # (family, table, chain) -> [(handle, canonical JSON of the rule)], in order
    rules: dict[tuple[str, str, str], list[tuple[int, str]]] = field(default_factory=dict)
    # table -> `nft list table` text (taken for baselines only)
    texts: dict[TableKey, str] = field(default_factory=dict)
    # iptables-nft table -> `iptables-nft-save -t` text, where nft cannot write it back
    xt_saves: dict[TableKey, str] = field(default_factory=dict)

    @property
    def tables(self) -> set[TableKey]:
        return {(fam, table) for fam, table, kind, _ in self.objects if kind == "table"}

    def table_same_as(self, other: "Snapshot", table: TableKey) -> bool:
        return (self._of(table) == other._of(table)
                and self._rule_texts(table) == other._rule_texts(table))

    def _of(self, table: TableKey) -> dict:
        return {k: v for k, v in self.objects.items() if k[:2] == table}

    def _rule_texts(self, table: TableKey) -> dict:
        return {k: [text for _, text in v] for k, v in self.rules.items()
                if v and k[:2] == table}

    def to_json(self) -> dict:
        """A form json.dumps can write (its keys are tuples); from_json reads it back."""
        return {"objects": [[list(k), v] for k, v in self.objects.items()],
                "rules": [[list(k), [list(r) for r in v]] for k, v in self.rules.items()],
                "texts": [[list(k), v] for k, v in self.texts.items()],
                "xt_saves": [[list(k), v] for k, v in self.xt_saves.items()]}

    @classmethod
    def from_json(cls, data: dict) -> "Snapshot":
        return cls(objects={tuple(k): v for k, v in data["objects"]},
                   rules={tuple(k): [(int(h), text) for h, text in v]
                          for k, v in data["rules"]},
                   texts={tuple(k): v for k, v in data["texts"]},
                   xt_saves={tuple(k): v for k, v in data["xt_saves"]})


def parse(items: list[dict], unreadable: list[TableKey] = ()) -> Snapshot:
    """A Snapshot of ``nft -j list ruleset`` items; the unreadable tables are UNREADABLE."""
    snap = Snapshot()
    for fam, name in unreadable:
        snap.objects[(fam, name, "table", "")] = UNREADABLE
    for item in items:
        ((kind, obj),) = item.items()
        if kind == "metainfo":
            continue
        if kind == "table":
            snap.objects[(obj["family"], obj["name"], "table", "")] = _canon(obj)
        elif kind == "rule":
            snap.rules.setdefault((obj["family"], obj["table"], obj["chain"]), []).append(
                (obj["handle"], _canon({"expr": obj.get("expr"), "comment": obj.get("comment")})))
        else:
            snap.objects[(obj["family"], obj["table"], kind, obj["name"])] = _canon(obj)
    return snap


def _nft(ns: str, *args: str) -> str:
    proc = netns.run(ns, ["nft", *args], check=False, changes=False)
    if proc.returncode != 0:
        raise NftError(f"{ns}: nft {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def _items(listing: str) -> list[dict]:
    return json.loads(listing or '{"nftables": []}').get("nftables", [])


def ruleset_items(ns: str) -> tuple[list[dict], list[TableKey]]:
    """The ruleset as ``nft -j list ruleset`` items, and the tables it could not read.

    Where nft prints the whole ruleset as JSON it cannot parse back (nft 1.0.6
    does for a table with ``flags owner``), it is read table by table, and the
    tables that still fail are returned apart, so that they are never taken for
    an empty ruleset.
    """
    try:
        return _items(_nft(ns, "-j", "list", "ruleset")), []
    except ValueError:
        pass
    items, unreadable = [], []
    for line in _nft(ns, "list", "tables").splitlines():
        _, fam, name = line.split()
        try:
            items += _items(_nft(ns, "-j", "list", "table", fam, name))
        except ValueError:
            unreadable.append((fam, name))
    return items, unreadable


def snapshot(ns: str, with_texts: bool = False) -> Snapshot:
    snap = parse(*ruleset_items(ns))
    if with_texts:
        for fam, table in snap.tables:
            text = netns.run(ns, ["nft", "list", "table", fam, table], check=False,
                             changes=False).stdout
            snap.texts[(fam, table)] = text
            if _XT_COMPAT.search(text) and fam in XT_SAVE and table in XTABLES:
                snap.xt_saves[(fam, table)] = netns.run(
                    ns, [XT_SAVE[fam], "-t", table], check=False, changes=False).stdout
    return snap


def _additions_only(cur: Snapshot, base: Snapshot, table: TableKey) -> list[str] | None:
    """Commands deleting what was added to a baseline table, or None when that is not all."""
    fam, name = table
    added = {k for k in cur._of(table) if k not in base.objects}
    if any(cur.objects.get(k) != v for k, v in base._of(table).items()):
        return None                      # a baseline object changed or went
    if any(k[2] not in DELETABLE for k in added):
        return None
    deletes: list[str] = []
    for key, base_rules in base.rules.items():
        if key[:2] != table:
            continue
        wanted = iter(text for _, text in base_rules)
        want = next(wanted, None)
        for handle, text in cur.rules.get(key, []):
            if text == want:
                want = next(wanted, None)
            else:
                deletes.append(f"delete rule {fam} {name} {key[2]} handle {handle}")
        if want is not None:
            return None                  # a baseline rule is missing
    for key, cur_rules in cur.rules.items():   # rules added to a baseline chain with none
        if key[:2] == table and key not in base.rules and \
                (fam, name, "chain", key[2]) not in added:
            deletes += [f"delete rule {fam} {name} {key[2]} handle {h}" for h, _ in cur_rules]
    new_chains = sorted(k[3] for k in added if k[2] == "chain")
    deletes += [f"flush chain {fam} {name} {c}" for c in new_chains]
    deletes += [f"delete chain {fam} {name} {c}" for c in new_chains]
    deletes += [f"delete {DELETABLE[kind]} {fam} {name} {obj}"
                for _, _, kind, obj in sorted(added) if kind != "chain"]
    return deletes


Step = tuple[list[str], str]             # a command and its standard input


def _recreate(base: Snapshot, table: TableKey, exists: bool) -> Step:
    fam, name = table
    if table in base.xt_saves:
        return [XT_RESTORE[fam]], base.xt_saves[table]
    return ["nft", "-f", "-"], (f"delete table {fam} {name}\n" if exists else "") + \
        base.texts[table]


def revert_plan(cur: Snapshot, base: Snapshot) -> dict[TableKey, Step]:
    """Per table that differs, the command (one transaction) taking it back to `base`."""
    plan: dict[TableKey, Step] = {}
    for fam, table in sorted(cur.tables - base.tables):
        plan[(fam, table)] = (["nft", "-f", "-"], f"delete table {fam} {table}")
    for key in sorted(base.tables):
        if key not in cur.tables:
            plan[key] = _recreate(base, key, exists=False)
        elif not cur.table_same_as(base, key):
            deletes = _additions_only(cur, base, key)
            plan[key] = _recreate(base, key, exists=True) if deletes is None else \
                (["nft", "-f", "-"], "\n".join(deletes))
    return plan


_CHANGE = re.compile(r"^(?:add|insert|replace|create|delete|destroy|flush|reset) "
                     r"(?:table|chain|rule|set|map|element|flowtable|counter|quota|limit|"
                     r"secmark|synproxy|ct helper|ct timeout|ct expectation) (\S+) (\S+)")


def describe_changes(ns: str, base: Snapshot, most: int = 20) -> str:
    """What differs from the baseline now, for an event: per table that a revert would touch,
    the lines of ``nft list table`` added (+) and gone (-), each with its chain; "" when
    nothing differs or the ruleset cannot be read."""
    try:
        cur = snapshot(ns)
    except NftError:
        return ""
    out = []
    for fam, table in sorted(revert_plan(cur, base)):
        now = _listed_lines(netns.run(ns, ["nft", "list", "table", fam, table], check=False,
                                      changes=False).stdout) if (fam, table) in cur.tables \
            else []
        was = _listed_lines(base.texts.get((fam, table), ""))
        diff = line_diff(was, now) or ["the same lines in another order"]
        if (fam, table) not in cur.tables:
            diff = ["deleted"]
        elif not was:
            diff = ["new"] + diff
        out.append(f"table {fam} {table}: " + "; ".join(diff[:most] + (
            [f"... {len(diff) - most} more"] if len(diff) > most else [])))
    return "; ".join(out)


def line_diff(was: list[str], now: list[str]) -> list[str]:
    """The lines added ("+line") and gone ("-line"), each as often as it was added or went
    (a duplicated line is one added); [] when both hold the same lines."""
    gone = Counter(was)
    gone.subtract(now)
    added = Counter(now)
    added.subtract(was)
    out = []
    for line in now:
        if added[line] > 0:
            added[line] -= 1
            out.append(f"+{line}")
    for line in was:
        if gone[line] > 0:
            gone[line] -= 1
            out.append(f"-{line}")
    return out


def _listed_lines(text: str) -> list[str]:
    """``nft list table`` text as "chain NAME: line" items, counters' values left out."""
    lines, chain = [], ""
    for raw in text.splitlines():
        line = re.sub(r"counter packets \d+ bytes \d+", "counter", raw.strip())
        if not line or line == "}" or line.startswith("table "):
            continue
        m = re.match(r"(chain|set|map) (\S+) \{$", line)
        if m:
            chain = f"{m.group(1)} {m.group(2)}"
            continue
        lines.append(f"{chain}: {line}" if chain else line)
    return lines


def tables_of(lines: list[str]) -> set[TableKey] | None:
    """The tables `nft monitor` lines of one transaction touched; None if one is not
    understood (or there are none: a flush of the whole ruleset touches them all)."""
    tables = set()
    for line in lines:
        m = _CHANGE.match(line)
        if not m:
            return None
        tables.add((m.group(1), m.group(2)))
    return tables or None


def summary(lines: list[str]) -> str:
    """`nft monitor` lines of one transaction, as one readable line."""
    out = []
    for line in lines:
        text = line.split(" # handle ")[0].replace(" counter packets 0 bytes 0", " counter")
        out.append(text.strip())
    return "; ".join(out)
