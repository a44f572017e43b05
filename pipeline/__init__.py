"""The `pipeline` command and its stages.

gRPC, which Beam runs its local workers over, installs fork() handlers for children that go
on using gRPC. Ours never do (loader workers of a student trained after a Beam stage in the
same process, as in `pipeline demo`, the stats pool), and with Beam's threads still alive
the handlers only log "Other threads are currently calling into gRPC, skipping fork()
handlers" at every fork. gRPC reads this switch once, when Beam first imports it: here,
before any stage module does. A value the user set is kept.
"""

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
