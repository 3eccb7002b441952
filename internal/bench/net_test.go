package bench

import "net"

type netConn = net.Conn

var dialer net.Dialer
