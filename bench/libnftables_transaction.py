#!/usr/bin/env python3
"""One mapping's add and delete transactions through libnftables, in-process (what netshim did
before it spoke netlink itself), for comparison with the ignored test
`kernel::nft::tests::transaction_cost`. Needs root and libnftables1 (a dependency of the nftables
package); run it in a network namespace of its own: `unshare -n python3 {this file}`."""
import ctypes
import time

TABLE = """table ip netshim {
	map ports {
		comment "protocol . host port -> container address . port (all host addresses)"
		type inet_proto . inet_service : ipv4_addr . inet_service
	}
	map ports_ip {
		comment "host address . protocol . host port -> container address . port (one host address)"
		type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service
	}
	set mapped {
		comment "protocol . host port of every mapping, for the loopback guard"
		type inet_proto . inet_service
	}
	chain guard {
		comment "drop packets for a mapped port sent to 127.0.0.0/8 from outside the host"
		type filter hook prerouting priority raw; policy accept;
		iifname != "lo" ip daddr 127.0.0.0/8 meta l4proto . th dport @mapped counter drop
	}
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		fib daddr type local meta l4proto { tcp, udp } jump dnat_ports
	}
	chain output {
		type nat hook output priority -100; policy accept;
		fib daddr type local meta l4proto { tcp, udp } jump dnat_ports
	}
	chain dnat_ports {
		dnat ip to ip daddr . meta l4proto . th dport map @ports_ip
		dnat ip to meta l4proto . th dport map @ports
	}
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		oifname "netshim0" ip saddr 127.0.0.0/8 masquerade comment "host to 127.0.0.1:hostPort"
		oifname "netshim0" ip saddr 10.213.0.0/16 ct status dnat masquerade comment "hairpin: container to a host port"
		ip saddr 10.213.0.0/16 oifname != "netshim0" masquerade comment "egress"
	}
	chain forward {
		type filter hook forward priority filter; policy accept;
		oifname "netshim0" ct state established,related accept
		oifname "netshim0" ct status dnat accept
		iifname "netshim0" accept
	}
}
"""

lib = ctypes.CDLL("libnftables.so.1")
lib.nft_ctx_new.restype = ctypes.c_void_p
lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
ctx = lib.nft_ctx_new(0)
lib.nft_ctx_buffer_output(ctx)
lib.nft_ctx_buffer_error(ctx)


def run(script):
    assert lib.nft_run_cmd_from_buffer(ctx, script.encode()) == 0, script


run("add table ip netshim\ndelete table ip netshim\n" + TABLE)
ROUNDS = 2000
for preload in (0, 1000):
    if preload:
        els = ", ".join(f"tcp . {20000 + i} : 10.213.1.1 . 80" for i in range(preload))
        run(f"add element ip netshim ports {{ {els} }}")
    add = ("add element ip netshim ports { tcp . 40000 : 10.213.0.2 . 80 }\n"
           "add element ip netshim mapped { tcp . 40000 }\n")
    delete = ("delete element ip netshim ports { tcp . 40000 }\n"
              "delete element ip netshim mapped { tcp . 40000 }\n")
    ta = td = 0.0
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        run(add)
        t1 = time.perf_counter()
        run(delete)
        ta += t1 - t0
        td += time.perf_counter() - t1
    print(f"libnftables, {preload} elements present: add {ta / ROUNDS * 1e6:.1f} µs, "
          f"delete {td / ROUNDS * 1e6:.1f} µs (mean of {ROUNDS})")
run("delete table ip netshim")
