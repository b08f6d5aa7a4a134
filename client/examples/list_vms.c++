// An orchestrator that is not Python: list a daemon's VMs and its peers over the orchestrator RPC, in C++ with the
// stock Cap'n Proto library (Debian: apt install capnproto libcapnp-dev). tests/client/test_cpp_client.py builds
// and runs it against a real daemon.
//
//   capnp compile -oc++ --src-prefix=PROTO PROTO/rpc.capnp PROTO/invariantd.capnp    (PROTO = protocol/schemas)
//   c++ -std=c++17 list_vms.c++ rpc.capnp.c++ invariantd.capnp.c++ -lcapnp-rpc -lcapnp -lkj-async -lkj -o list_vms
//   ./list_vms unix:/run/invariantd/rpc.sock
//
// The unix socket is the daemon's default RPC listener (mode 0660: the caller's group is the access control). Over
// TCP the daemon takes mutual TLS only; kj's TLS (kj/compat/tls.h) or a TLS tunnel then carries the same calls.
#include <capnp/ez-rpc.h>
#include <iostream>
#include "rpc.capnp.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: " << argv[0] << " unix:/path/to/rpc.sock" << std::endl;
    return 2;
  }
  capnp::EzRpcClient client(argv[1]);
  auto& ws = client.getWaitScope();
  Orchestrator::Client orch = client.getMain<Orchestrator>();

  auto vms = orch.listVmsRequest().send().wait(ws);
  if (vms.getError().getKind() != ErrorKind::OK) {
    std::cerr << "listVms: " << vms.getError().getMessage().cStr() << std::endl;
    return 1;
  }
  for (auto vm : vms.getVms()) {
    std::cout << "vm " << vm.getName().cStr() << " " << vm.getState().cStr() << " " << vm.getNVcpus()
              << " vCPUs " << vm.getArch().cStr() << std::endl;
  }
  auto peers = orch.peersRequest().send().wait(ws);
  std::cout << "node " << peers.getNode().cStr() << std::endl;
  for (auto p : peers.getPeers()) {
    std::cout << "peer " << p.getName().cStr() << " " << p.getAddress().cStr() << std::endl;
  }
  return 0;
}
