# Answers access questions about a compiled SELinux policy with setools,
# inside the build's tools tree (the distro's setools reads the distro's
# policy version; the host's may not). Reads JSON from stdin:
#   {"policy": PATH, "access": [[source, target, class, permission], ...]}
# and writes {"access": [bool, ...], "types": [name, ...]}.
# Attributes are expanded on both sides, and conditional rules count
# whatever their boolean's value: "allowed" means some rule could allow it.
import json
import sys

import setools

request = json.load(sys.stdin)
policy = setools.SELinuxPolicy(request["policy"])
answers = []
for source, target, tclass, permission in request["access"]:
    query = setools.TERuleQuery(
        policy,
        ruletype=["allow"],
        source=source,
        target=target,
        tclass=[tclass],
        perms=[permission],
    )
    answers.append(any(True for _ in query.results()))
json.dump({"access": answers, "types": sorted(str(t) for t in policy.types())}, sys.stdout)
