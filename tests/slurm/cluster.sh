#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, over the loopback address, for the tests (tests/test_slurm.py).
#   tests/slurm/cluster.sh start DIR   writes DIR/slurm.conf, starts munged, slurmctld and slurmd, waits until
#                                      `sinfo` shows the node idle; clients then need SLURM_CONF=DIR/slurm.conf
#   tests/slurm/cluster.sh stop DIR    stops the three daemons (also after a failed start)
# Needs Debian's slurm-wlm and munge (apt-get install slurm-wlm munge: a step of .ci/run and of the README's
# dev set-up); it installs nothing. One node = this machine: its CPUs and memory as `slurmd -C` reports them,
# proctrack/linuxproc, task/none, no cgroups, no accounting.
set -euo pipefail
cmd=${1:?start or stop}; dir=$(realpath -m "${2:?a folder for the cluster\'s files}")
export SLURM_CONF=$dir/slurm.conf

stop() {
  # the cluster's jobs first (their steps are children of slurmd), then the daemons; SIGKILL what lingers
  scancel --quiet --full --user="$(id -un)" 2>/dev/null || true
  for _ in $(seq 1 10); do [ -z "$(squeue -h 2>/dev/null || true)" ] && break; sleep 1; done
  pids=""
  for name in slurmd slurmctld munged; do [ -f "$dir/$name.pid" ] && pids="$pids $(cat "$dir/$name.pid")"; done
  pids="$pids $(pgrep -f "slurm(ctl)?d -f $dir/slurm.conf" || true)"
  kill $pids 2>/dev/null || true
  for _ in $(seq 1 10); do kill -0 $pids 2>/dev/null || break; sleep 0.5; done
  kill -9 $pids 2>/dev/null || true
  return 0
}

if [ "$cmd" = stop ]; then stop; exit 0; fi
[ "$cmd" = start ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }
for tool in munged slurmctld slurmd sinfo sbatch; do
  command -v "$tool" >/dev/null || { echo "$tool not found: apt-get install slurm-wlm munge" >&2; exit 3; }
done
mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
host=$(hostname -s)
# munge: its own key and socket under DIR, so that nothing of the machine's is touched
[ -f "$dir/munge/munge.key" ] || dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
chmod 700 "$dir/munge"; chmod 400 "$dir/munge/munge.key"
munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
  --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge/munge.seed"
node=$(slurmd -C | head -n 1 | sed -e "s/^NodeName=[^ ]*/NodeName=$host NodeAddr=127.0.0.1/" -e 's/ UpTime=.*//')
cat > "$dir/slurm.conf" <<CONF
ClusterName=lp
SlurmctldHost=$host(127.0.0.1)
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
KillWait=2
SlurmUser=root
SlurmdUser=root
SlurmctldPort=16817
SlurmdPort=16818
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
slurmctld -f "$dir/slurm.conf" -i
slurmd -f "$dir/slurm.conf"
for _ in $(seq 1 60); do
  state=$(sinfo -h -N -o %t 2>/dev/null | head -n 1 || true)
  [ "$state" = idle ] && { echo "one-node cluster up: $host idle ($SLURM_CONF)"; exit 0; }
  sleep 1
done
echo "the node did not become idle (state: ${state:-none}); logs in $dir" >&2
tail -n 20 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
stop; exit 1
