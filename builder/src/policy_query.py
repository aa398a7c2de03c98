# Answers access questions about a compiled SELinux policy with setools,
# inside the build's tools tree (the distro's setools reads the distro's
# policy version; the host's may not). Reads JSON from stdin:
#   {"policy": PATH, "access": [[source, target, class, permission], ...]}
# and writes {"access": [bool, ...], "types": [name, ...]}.
# Attributes are expanded on both sides, and conditional rules count
# whatever their boolean's value: "allowed" means some rule could allow it.
#
# One pass over the allow rules, indexed by class, instead of one
# TERuleQuery per question (each of which walks every rule: minutes for a
# hundred questions against the distro policy).
import collections
import json
import sys

import setools

request = json.load(sys.stdin)
policy = setools.SELinuxPolicy(request["policy"])
questions = request["access"]
classes = {q[2] for q in questions}

rules_by_class = collections.defaultdict(list)
for rule in policy.terules():
    if rule.ruletype != setools.TERuletype.allow:
        continue
    tclass = str(rule.tclass)
    if tclass in classes:
        rules_by_class[tclass].append((str(rule.source), str(rule.target), {str(p) for p in rule.perms}))

names_cache = {}


def names_of(type_name):
    """The type and every attribute it has: what a rule may name it by."""
    if type_name not in names_cache:
        try:
            t = policy.lookup_type(type_name)
        except Exception:
            sys.exit(f"policy_query: no type {type_name!r} in the policy")
        names_cache[type_name] = {type_name} | {str(a) for a in t.attributes()}
    return names_cache[type_name]


answers = []
for source, target, tclass, permission in questions:
    sources, targets = names_of(source), names_of(target)
    allowed = any(
        permission in perms and rule_source in sources and (rule_target in targets or (rule_target == "self" and source == target))
        for rule_source, rule_target, perms in rules_by_class.get(tclass, ())
    )
    answers.append(allowed)
json.dump({"access": answers, "types": sorted(str(t) for t in policy.types())}, sys.stdout)
