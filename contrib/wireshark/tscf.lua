-- tscf.lua: a Wireshark dissector for tscf's wire protocol, version 1 (docs/PROTOCOL.md).
--
-- Its filter name is `tscftun`: Wireshark already has a `tscf` (IEEE 1722 Time-Synchronous
-- Control Format). Every field starts with `tscftun.`.
--
-- What it decodes
--   Envelopes (type, length), control messages (header and every message type and TLV of the
--   specification, short and long TLV forms, unknown TLVs shown as such), and Data envelopes,
--   whose inner IPv4 or IPv6 packet goes to Wireshark's own `ip`/`ipv6` dissectors. Responses
--   are linked to their requests (tscftun.response_in, tscftun.request_in,
--   tscftun.response_time). Malformed input and the specification's rules (lengths, counts,
--   which TLV in which message, nothing after Message Integrity, illegal values) are flagged
--   as expert information. Message Integrity is shown, not verified (that needs the pair's
--   token).
--
-- Where it looks
--   * TCP port 4440 and UDP port 4440: the defaults of `tscf server` (tscf and STUN share the
--     UDP port; on it the first octet picks STUN, tscf, DTLS or QUIC as PROTOCOL.md §2.4 says).
--   * TLS on TCP port 4443 and DTLS on UDP port 4445, the other defaults: the decrypted
--     application data is tscf.
--   * Anywhere else (other listener ports, peer paths, peer streams, TLS and DTLS sessions on
--     any port): heuristics on TCP, UDP, TLS and DTLS that accept a first octet of 4 (Data,
--     with an IP packet of the stated size) or 5 (Control, version 1, a length a control
--     message can have); on UDP the length must also equal the datagram's.
--   The ports are preferences (Protocols › TSCFTUN).
--   Not decoded: QUIC (the server's QUIC listener, QUIC peer sessions).
--
-- Install
--   Copy this file into Wireshark's personal Lua plugins folder (Help › About Wireshark ›
--   Folders › "Personal Lua Plugins", ~/.local/lib/wireshark/plugins on Linux) and restart, or
--   load it for one run:
--     wireshark -X lua_script:contrib/wireshark/tscf.lua capture.pcapng
--     tshark -X lua_script:contrib/wireshark/tscf.lua -r capture.pcapng -Y tscftun \
--       -T fields -e frame.number -e tscftun.msg.type -e tscftun.result_code
--   TLS and DTLS decrypt with a key log (SSLKEYLOGFILE format) of either end:
--     tshark -X lua_script:contrib/wireshark/tscf.lua -o tls.keylog_file:keys.log -r tls.pcapng
--
-- Display filters: tscftun, tscftun.type == 4, tscftun.msg.type == 0x0b,
-- tscftun.result_code != 0, tscftun.candidate.port == 50000, tscftun.tlv.type == 0x0d,
-- tscftun.msg.tunnel_id == 0x5a17c0de20240b01, !tscftun.response_in && tscftun.msg.type == 7
-- (unanswered keepalives; two-pass, as Wireshark and `tshark -2` do), expert.message.
--
-- Tested with tshark 4.0 (Lua 5.2) by the `wireshark` test of the tests crate; it uses no
-- bit operators, so the Lua 5.3 and 5.4 of later Wireshark versions read it as well.

local tscf = Proto("tscftun", "tscf tunnel protocol (TSC)")

---------------------------------------------------------------------------------------------
-- Codes (PROTOCOL.md §2.1, §3.2, §4.2, §5)
---------------------------------------------------------------------------------------------

local ENVELOPE_DATA = 0x04
local ENVELOPE_CONTROL = 0x05
local ENVELOPE_HEADER_LEN = 3
local CONTROL_HEADER_LEN = 14
local MAX_CONTROL_LEN = 2048
local MAX_TLVS = 32
local LONG_FORM = 0xff

local envelope_types = { [ENVELOPE_DATA] = "Data", [ENVELOPE_CONTROL] = "Control" }

local message_types = {
    [0x01] = "Configuration Request",
    [0x02] = "Configuration Response",
    [0x03] = "Configuration Release Request",
    [0x04] = "Configuration Release Response",
    [0x05] = "Configuration Release Notification",
    [0x06] = "Configuration Release Notification Response",
    [0x07] = "Keepalive",
    [0x08] = "Keepalive Response",
    [0x09] = "Client Service Request",
    [0x0a] = "Client Service Response",
    [0x0b] = "Peer Probe",
    [0x0c] = "Peer Probe Response",
}

local result_codes = {
    [0] = "Success",
    [1] = "Version Not Supported",
    [2] = "Malformed",
    [3] = "Unknown Message",
    [4] = "Unknown Critical TLV",
    [5] = "Illegal Value",
    [6] = "No Address Available",
    [7] = "Tunnel Not Found",
    [8] = "Service Not Enabled",
    [9] = "Peer Unavailable",
    [10] = "Peer Timeout",
    [11] = "Unauthorized",
    [12] = "Rate Limited",
    [13] = "Server Full",
    [14] = "Administrative",
    [15] = "Shutdown",
    [16] = "Timeout",
    [17] = "Internal Error",
}

local transports = { [1] = "UDP", [2] = "TCP", [3] = "TLS", [4] = "DTLS", [5] = "QUIC" }
local service_types = { [1] = "Peer", [2] = "DDT", [3] = "Redundancy", [4] = "Multipath" }
local service_actions = { [1] = "Establish", [2] = "Release", [3] = "Announce" }
local peer_service_results = { [1] = "Available", [2] = "Unavailable", [3] = "In Progress" }
local candidate_kinds = { [1] = "Host", [2] = "Server Reflexive", [3] = "Peer Reflexive" }

-- Message types by name, for the registry below.
local CONF_REQ, CONF_RESP, REL_REQ, REL_RESP = 0x01, 0x02, 0x03, 0x04
local REL_NOTE, REL_NOTE_RESP, KA, KA_RESP = 0x05, 0x06, 0x07, 0x08
local SVC_REQ, SVC_RESP, PROBE, PROBE_RESP = 0x09, 0x0a, 0x0b, 0x0c
local RESPONSES = { CONF_RESP, REL_RESP, REL_NOTE_RESP, KA_RESP, SVC_RESP, PROBE_RESP }

local function set_of(...)
    local set = {}
    for _, list in ipairs({ ... }) do
        if type(list) == "table" then
            for _, v in ipairs(list) do set[v] = true end
        else
            set[list] = true
        end
    end
    return set
end

local ALL_MESSAGES = set_of(CONF_REQ, CONF_RESP, REL_REQ, REL_RESP, REL_NOTE, REL_NOTE_RESP, KA,
    KA_RESP, SVC_REQ, SVC_RESP, PROBE, PROBE_RESP)

---------------------------------------------------------------------------------------------
-- Fields
---------------------------------------------------------------------------------------------

local tlv_names = {
    [0x01] = "Supported Version",
    [0x02] = "Tunnel Id",
    [0x03] = "Re-attach Secret",
    [0x04] = "Internal IPv4 Address",
    [0x05] = "Internal IPv6 Address",
    [0x06] = "DNS Server",
    [0x07] = "Keepalive Interval",
    [0x08] = "Result Code",
    [0x09] = "Service Type",
    [0x0a] = "Connection Info",
    [0x0b] = "Peer Service Result",
    [0x0c] = "Candidate",
    [0x0d] = "Peer Credentials",
    [0x0e] = "Client Capabilities",
    [0x0f] = "Peer Internal Address",
    [0x10] = "Auth Token",
    [0x11] = "Service Action",
    [0x12] = "Certificate Fingerprint",
    [0x13] = "Observed Address",
    [0x14] = "Message Integrity",
    [0x15] = "Client Nonce",
    [0x16] = "Control Key",
    [0x80] = "Software",
    [0x81] = "Diagnostic",
    [0x82] = "Maximum Packet Size",
    [0x83] = "STUN Port",
}

local f = {
    type = ProtoField.uint8("tscftun.type", "Envelope Type", base.HEX, envelope_types),
    len = ProtoField.uint16("tscftun.len", "Envelope Length", base.DEC),

    version = ProtoField.uint8("tscftun.msg.version", "Version", base.DEC),
    msg_type = ProtoField.uint8("tscftun.msg.type", "Message Type", base.HEX, message_types),
    seq = ProtoField.uint32("tscftun.msg.seq", "Sequence Number", base.DEC),
    seq_director = ProtoField.bool("tscftun.msg.seq.director", "Director-originated", 32,
        { "Yes", "No" }, 0x80000000),
    tunnel = ProtoField.uint64("tscftun.msg.tunnel_id", "Tunnel Id", base.HEX),
    response_in = ProtoField.framenum("tscftun.response_in", "Response In", base.NONE),
    request_in = ProtoField.framenum("tscftun.request_in", "Request In", base.NONE),
    response_time = ProtoField.relative_time("tscftun.response_time", "Response Time"),

    data = ProtoField.bytes("tscftun.data", "Payload"),

    tlv = ProtoField.none("tscftun.tlv", "TLV"),
    tlv_type = ProtoField.uint8("tscftun.tlv.type", "TLV Type", base.HEX, tlv_names),
    tlv_len = ProtoField.uint16("tscftun.tlv.len", "TLV Length", base.DEC),
    tlv_value = ProtoField.bytes("tscftun.tlv.value", "Value"),

    supported_version = ProtoField.uint8("tscftun.supported_version", "Supported Version"),
    tunnel_id = ProtoField.uint64("tscftun.tunnel_id", "Tunnel Id to Re-attach", base.HEX),
    reattach_secret = ProtoField.bytes("tscftun.reattach_secret", "Re-attach Secret"),
    internal_ipv4 = ProtoField.ipv4("tscftun.internal_ipv4", "Internal IPv4 Address"),
    internal_ipv4_prefix = ProtoField.uint8("tscftun.internal_ipv4.prefix_len", "Prefix Length"),
    internal_ipv6 = ProtoField.ipv6("tscftun.internal_ipv6", "Internal IPv6 Address"),
    internal_ipv6_prefix = ProtoField.uint8("tscftun.internal_ipv6.prefix_len", "Prefix Length"),
    dns_ipv4 = ProtoField.ipv4("tscftun.dns_server.ipv4", "DNS Server"),
    dns_ipv6 = ProtoField.ipv6("tscftun.dns_server.ipv6", "DNS Server"),
    keepalive = ProtoField.uint32("tscftun.keepalive_interval", "Keepalive Interval (ms)"),
    result_code = ProtoField.uint16("tscftun.result_code", "Result Code", base.DEC, result_codes),
    service_type = ProtoField.uint8("tscftun.service_type", "Service Type", base.DEC, service_types),
    conn_transport = ProtoField.uint8("tscftun.connection_info.transport", "Transport", base.DEC,
        transports),
    conn_port = ProtoField.uint16("tscftun.connection_info.port", "Port"),
    conn_ipv4 = ProtoField.ipv4("tscftun.connection_info.ipv4", "Address"),
    conn_ipv6 = ProtoField.ipv6("tscftun.connection_info.ipv6", "Address"),
    peer_service_result = ProtoField.uint8("tscftun.peer_service_result", "Peer Service Result",
        base.DEC, peer_service_results),
    cand_kind = ProtoField.uint8("tscftun.candidate.kind", "Kind", base.DEC, candidate_kinds),
    cand_transport = ProtoField.uint8("tscftun.candidate.transport", "Transport", base.DEC,
        transports),
    cand_port = ProtoField.uint16("tscftun.candidate.port", "Port"),
    cand_ipv4 = ProtoField.ipv4("tscftun.candidate.ipv4", "Address"),
    cand_ipv6 = ProtoField.ipv6("tscftun.candidate.ipv6", "Address"),
    cred_token = ProtoField.bytes("tscftun.peer_credentials.token", "Token"),
    cred_fingerprint = ProtoField.bytes("tscftun.peer_credentials.fingerprint",
        "Other Peer's Certificate SHA-256"),
    capabilities = ProtoField.uint32("tscftun.client_capabilities", "Client Capabilities", base.HEX),
    cap_peer = ProtoField.bool("tscftun.client_capabilities.peer_tunneling", "Peer Tunneling", 32,
        { "Yes", "No" }, 0x00000001),
    peer_ipv4 = ProtoField.ipv4("tscftun.peer_internal_address.ipv4", "Peer Internal Address"),
    peer_ipv6 = ProtoField.ipv6("tscftun.peer_internal_address.ipv6", "Peer Internal Address"),
    auth_token = ProtoField.bytes("tscftun.auth_token", "Auth Token"),
    service_action = ProtoField.uint8("tscftun.service_action", "Service Action", base.DEC,
        service_actions),
    fingerprint = ProtoField.bytes("tscftun.certificate_fingerprint", "Certificate SHA-256"),
    observed_port = ProtoField.uint16("tscftun.observed_address.port", "Port"),
    observed_ipv4 = ProtoField.ipv4("tscftun.observed_address.ipv4", "Address"),
    observed_ipv6 = ProtoField.ipv6("tscftun.observed_address.ipv6", "Address"),
    integrity = ProtoField.bytes("tscftun.message_integrity", "HMAC-SHA-256"),
    client_nonce = ProtoField.bytes("tscftun.client_nonce", "Client Nonce"),
    control_key = ProtoField.bytes("tscftun.control_key", "Control Key"),
    software = ProtoField.string("tscftun.software", "Software"),
    diagnostic = ProtoField.string("tscftun.diagnostic", "Diagnostic"),
    max_packet_size = ProtoField.uint16("tscftun.max_packet_size", "Maximum Packet Size"),
    stun_port = ProtoField.uint16("tscftun.stun_port", "STUN Port"),
}

local fields = {}
for _, field in pairs(f) do fields[#fields + 1] = field end
tscf.fields = fields

local e = {
    framing = ProtoExpert.new("tscftun.framing", "Envelope Length below 3: framing lost",
        expert.group.MALFORMED, expert.severity.ERROR),
    datagram_len = ProtoExpert.new("tscftun.datagram_len", "Envelope Length is not the datagram's",
        expert.group.MALFORMED, expert.severity.ERROR),
    unknown_envelope = ProtoExpert.new("tscftun.unknown_envelope", "Unknown envelope type",
        expert.group.PROTOCOL, expert.severity.WARN),
    not_ip = ProtoExpert.new("tscftun.data.not_ip", "Data payload is not one whole IP packet",
        expert.group.MALFORMED, expert.severity.ERROR),
    truncated = ProtoExpert.new("tscftun.truncated", "Control message shorter than its header",
        expert.group.MALFORMED, expert.severity.ERROR),
    version = ProtoExpert.new("tscftun.version", "Unsupported version",
        expert.group.PROTOCOL, expert.severity.WARN),
    unknown_message = ProtoExpert.new("tscftun.unknown_message", "Unknown message type",
        expert.group.PROTOCOL, expert.severity.WARN),
    malformed = ProtoExpert.new("tscftun.malformed", "Malformed control message",
        expert.group.MALFORMED, expert.severity.ERROR),
    unknown_critical = ProtoExpert.new("tscftun.unknown_critical_tlv",
        "Unknown comprehension-required TLV", expert.group.PROTOCOL, expert.severity.WARN),
    unknown_optional = ProtoExpert.new("tscftun.unknown_optional_tlv",
        "Unknown optional TLV (skipped)", expert.group.PROTOCOL, expert.severity.NOTE),
    illegal = ProtoExpert.new("tscftun.illegal_value", "Illegal value",
        expert.group.PROTOCOL, expert.severity.WARN),
    error_result = ProtoExpert.new("tscftun.error_result", "Result Code is not Success",
        expert.group.RESPONSE_CODE, expert.severity.NOTE),
}

local experts = {}
for _, ex in pairs(e) do experts[#experts + 1] = ex end
tscf.experts = experts

---------------------------------------------------------------------------------------------
-- Preferences: the ports the port tables use
---------------------------------------------------------------------------------------------

local DEFAULT_PORTS = { tcp = 4440, udp = 4440, tls = 4443, dtls = 4445 }

tscf.prefs.tcp_port = Pref.uint("TCP port", DEFAULT_PORTS.tcp, "tscf over TCP (0: none)")
tscf.prefs.udp_port = Pref.uint("UDP port", DEFAULT_PORTS.udp,
    "tscf over UDP, beside STUN, DTLS and QUIC (0: none)")
tscf.prefs.tls_port = Pref.uint("TLS port", DEFAULT_PORTS.tls, "tscf over TLS on TCP (0: none)")
tscf.prefs.dtls_port = Pref.uint("DTLS port", DEFAULT_PORTS.dtls, "tscf over DTLS on UDP (0: none)")

---------------------------------------------------------------------------------------------
-- Helpers
---------------------------------------------------------------------------------------------

local function name_or_unknown(table, value)
    return table[value] or string.format("Unknown (%d)", value)
end

-- "10.77.0.2" or "2001:db8::10" from a 4- or 16-octet range.
local function ip_text(range)
    if range:len() == 4 then return tostring(range:ipv4()) end
    return tostring(range:ipv6())
end

local function socket_text(addr_range, port)
    if addr_range:len() == 16 then
        return string.format("[%s]:%d", ip_text(addr_range), port)
    end
    return string.format("%s:%d", ip_text(addr_range), port)
end

-- Adds an IPv4 or IPv6 address (by the range's length) with one of two fields.
local function add_ip(tree, range, field4, field6)
    if range:len() == 4 then return tree:add(field4, range) end
    return tree:add(field6, range)
end

---------------------------------------------------------------------------------------------
-- TLV values (PROTOCOL.md §4.2). Each decoder gets the TLV's subtree and value range (whose
-- length the registry has checked) and returns the summary shown on the TLV's line, and the
-- reason if the value is illegal (§4.3 step 6) with the item to flag. Only the text TLVs may
-- be empty; their decoder gets the TLV's header range to point at instead.
---------------------------------------------------------------------------------------------

local function decode_supported_version(tree, v)
    local list = {}
    for i = 0, v:len() - 1 do
        tree:add(f.supported_version, v(i, 1))
        list[#list + 1] = tostring(v(i, 1):uint())
    end
    return table.concat(list, ", ")
end

local function decode_tunnel_id(tree, v)
    tree:add(f.tunnel_id, v)
    return "0x" .. v:uint64():tohex()
end

local function decode_reattach_secret(tree, v)
    tree:add(f.reattach_secret, v)
    return v:bytes():tohex(true)
end

local function decode_internal(field_addr, field_prefix, addr_len)
    return function(tree, v)
        tree:add(field_addr, v(0, addr_len))
        local prefix = v(addr_len, 1):uint()
        local item = tree:add(field_prefix, v(addr_len, 1))
        local text = string.format("%s/%d", ip_text(v(0, addr_len)), prefix)
        if prefix > addr_len * 8 then
            return text, "prefix length longer than the address", item
        end
        return text
    end
end

local function decode_dns(tree, v)
    add_ip(tree, v, f.dns_ipv4, f.dns_ipv6)
    return ip_text(v)
end

local function decode_keepalive(tree, v)
    local item = tree:add(f.keepalive, v)
    local ms = v:uint()
    if ms < 100 or ms > 86400000 then
        return ms .. " ms", "Keepalive Interval out of range (100 ms to 24 h)", item
    end
    return ms .. " ms"
end

local function decode_result_code(tree, v)
    local item = tree:add(f.result_code, v)
    local code = v:uint()
    if code ~= 0 then
        item:add_proto_expert_info(e.error_result,
            "Result Code " .. name_or_unknown(result_codes, code) .. " (" .. code .. ")")
    end
    return string.format("%s (%d)", name_or_unknown(result_codes, code), code)
end

local function decode_code(field, names)
    return function(tree, v)
        tree:add(field, v)
        return name_or_unknown(names, v:uint())
    end
end

-- Transport (1), port (2, not 0), address (4 or 16).
local function decode_connection_info(tree, v)
    tree:add(f.conn_transport, v(0, 1))
    local port_item = tree:add(f.conn_port, v(1, 2))
    add_ip(tree, v(3), f.conn_ipv4, f.conn_ipv6)
    local port = v(1, 2):uint()
    local text = string.format("%s %s", name_or_unknown(transports, v(0, 1):uint()),
        socket_text(v(3), port))
    if port == 0 then return text, "port 0", port_item end
    return text
end

-- Kind (1), transport (1), port (2, not 0), address (4 or 16).
local function decode_candidate(tree, v)
    tree:add(f.cand_kind, v(0, 1))
    tree:add(f.cand_transport, v(1, 1))
    local port_item = tree:add(f.cand_port, v(2, 2))
    add_ip(tree, v(4), f.cand_ipv4, f.cand_ipv6)
    local port = v(2, 2):uint()
    local text = string.format("%s %s %s", name_or_unknown(candidate_kinds, v(0, 1):uint()),
        name_or_unknown(transports, v(1, 1):uint()), socket_text(v(4), port))
    if port == 0 then return text, "port 0", port_item end
    return text
end

local function decode_peer_credentials(tree, v)
    tree:add(f.cred_token, v(0, 16))
    if v:len() == 48 then
        tree:add(f.cred_fingerprint, v(16, 32))
        return "token and the other peer's fingerprint"
    end
    return "token"
end

local function decode_capabilities(tree, v)
    local item = tree:add(f.capabilities, v)
    item:add(f.cap_peer, v)
    local caps = v:uint()
    if caps % 2 == 1 then
        return string.format("0x%08x (peer tunneling)", caps)
    end
    return string.format("0x%08x", caps)
end

local function decode_peer_internal(tree, v)
    add_ip(tree, v, f.peer_ipv4, f.peer_ipv6)
    return ip_text(v)
end

local function decode_auth_token(tree, v)
    tree:add(f.auth_token, v)
    return v:len() .. " octets"
end

local function decode_fingerprint(tree, v)
    tree:add(f.fingerprint, v)
    return v:bytes():tohex(true)
end

-- Port (2, not 0), address (4 or 16).
local function decode_observed(tree, v)
    local port_item = tree:add(f.observed_port, v(0, 2))
    add_ip(tree, v(2), f.observed_ipv4, f.observed_ipv6)
    local port = v(0, 2):uint()
    local text = socket_text(v(2), port)
    if port == 0 then return text, "port 0", port_item end
    return text
end

local function decode_integrity(tree, v)
    tree:add(f.integrity, v)
    return v:bytes():tohex(true)
end

local function decode_bytes(field)
    return function(tree, v)
        tree:add(field, v)
        return v:bytes():tohex(true)
    end
end

local function decode_text(field)
    return function(tree, v, whole)
        if v == nil then
            tree:add(field, whole, "")
            return '""'
        end
        local item = tree:add_packet_field(field, v, ENC_UTF_8)
        return '"' .. v:string(ENC_UTF_8) .. '"', nil, item
    end
end

local function decode_max_packet_size(tree, v)
    local item = tree:add(f.max_packet_size, v)
    local size = v:uint()
    if size < 68 then return size .. " octets", "Maximum Packet Size below 68", item end
    return size .. " octets"
end

local function decode_stun_port(tree, v)
    local item = tree:add(f.stun_port, v)
    local port = v:uint()
    if port == 0 then return "0", "port 0", item end
    return tostring(port)
end

-- The registry (PROTOCOL.md §4.2, as tscf-core's wire/tlv.rs holds it): allowed value
-- lengths (a set, or {min = , max = }), how many per message, which messages may carry it.
local registry = {
    [0x01] = { lengths = { min = 1, max = 16 }, max = 1, messages = set_of(CONF_REQ, CONF_RESP),
        decode = decode_supported_version },
    [0x02] = { lengths = set_of(8), max = 1, messages = set_of(CONF_REQ),
        decode = decode_tunnel_id },
    [0x03] = { lengths = set_of(16), max = 1, messages = set_of(CONF_REQ, CONF_RESP),
        decode = decode_reattach_secret },
    [0x04] = { lengths = set_of(5), max = 1, messages = set_of(CONF_RESP),
        decode = decode_internal(f.internal_ipv4, f.internal_ipv4_prefix, 4) },
    [0x05] = { lengths = set_of(17), max = 1, messages = set_of(CONF_RESP),
        decode = decode_internal(f.internal_ipv6, f.internal_ipv6_prefix, 16) },
    [0x06] = { lengths = set_of(4, 16), max = 4, messages = set_of(CONF_RESP),
        decode = decode_dns },
    [0x07] = { lengths = set_of(4), max = 1, messages = set_of(CONF_REQ, CONF_RESP),
        decode = decode_keepalive },
    [0x08] = { lengths = set_of(2), max = 1, messages = set_of(RESPONSES, REL_REQ, REL_NOTE),
        decode = decode_result_code },
    [0x09] = { lengths = set_of(1), max = 1, messages = set_of(SVC_REQ, SVC_RESP),
        decode = decode_code(f.service_type, service_types) },
    [0x0a] = { lengths = set_of(7, 19), max = 1, messages = set_of(SVC_REQ, SVC_RESP),
        decode = decode_connection_info },
    [0x0b] = { lengths = set_of(1), max = 1, messages = set_of(SVC_RESP),
        decode = decode_code(f.peer_service_result, peer_service_results) },
    [0x0c] = { lengths = set_of(8, 20), max = 8, messages = set_of(SVC_REQ, SVC_RESP),
        decode = decode_candidate },
    [0x0d] = { lengths = set_of(16, 48), max = 1, messages = set_of(SVC_REQ, SVC_RESP),
        decode = decode_peer_credentials },
    [0x0e] = { lengths = set_of(4), max = 1, messages = set_of(CONF_REQ, SVC_REQ),
        decode = decode_capabilities },
    [0x0f] = { lengths = set_of(4, 16), max = 1,
        messages = set_of(CONF_REQ, CONF_RESP, SVC_REQ, SVC_RESP, PROBE, PROBE_RESP),
        decode = decode_peer_internal },
    [0x10] = { lengths = { min = 1, max = 1024 }, max = 1, messages = set_of(CONF_REQ),
        decode = decode_auth_token },
    [0x11] = { lengths = set_of(1), max = 1, messages = set_of(SVC_REQ),
        decode = decode_code(f.service_action, service_actions) },
    [0x12] = { lengths = set_of(32), max = 1, messages = set_of(SVC_REQ, SVC_RESP),
        decode = decode_fingerprint },
    [0x13] = { lengths = set_of(6, 18), max = 1, messages = set_of(CONF_RESP, PROBE_RESP),
        decode = decode_observed },
    [0x14] = { lengths = set_of(32), max = 1, messages = ALL_MESSAGES,
        decode = decode_integrity },
    [0x15] = { lengths = set_of(16), max = 1, messages = set_of(CONF_REQ, CONF_RESP),
        decode = decode_bytes(f.client_nonce) },
    [0x16] = { lengths = set_of(32), max = 1, messages = set_of(CONF_RESP),
        decode = decode_bytes(f.control_key) },
    [0x80] = { lengths = { min = 0, max = 255 }, max = 1, messages = ALL_MESSAGES,
        decode = decode_text(f.software) },
    [0x81] = { lengths = { min = 0, max = 255 }, max = 1, messages = ALL_MESSAGES,
        decode = decode_text(f.diagnostic) },
    [0x82] = { lengths = set_of(2), max = 1, messages = set_of(CONF_RESP),
        decode = decode_max_packet_size },
    [0x83] = { lengths = set_of(2), max = 1, messages = set_of(CONF_RESP),
        decode = decode_stun_port },
}

local function length_allowed(rule, len)
    if rule.lengths.min then
        return len >= rule.lengths.min and len <= rule.lengths.max
    end
    return rule.lengths[len] == true
end

---------------------------------------------------------------------------------------------
-- Control messages (PROTOCOL.md §3, §4)
---------------------------------------------------------------------------------------------

-- Requests seen, to link responses: key -> { frame, time, response }. A response matches the
-- request of type t - 1 with the same sequence number that went the other way.
local requests = {}

local function exchange_key(src, dst, request_type, seq)
    return table.concat({ src, dst, request_type, seq }, "|")
end

-- Links a request and its response (§3.1: the response echoes the sequence number).
local function track_exchange(pinfo, tree, endpoints, msg_type, seq)
    if message_types[msg_type] == nil then return end
    if msg_type % 2 == 1 then
        local key = exchange_key(endpoints.src, endpoints.dst, msg_type, seq)
        local entry = requests[key]
        if not pinfo.visited and entry == nil then
            requests[key] = { frame = pinfo.number, time = pinfo.abs_ts }
            entry = requests[key]
        end
        if entry and entry.response then
            tree:add(f.response_in, entry.response):set_generated()
        end
    else
        local key = exchange_key(endpoints.dst, endpoints.src, msg_type - 1, seq)
        local entry = requests[key]
        if entry == nil then return end
        if not pinfo.visited and entry.response == nil then
            entry.response = pinfo.number
        end
        tree:add(f.request_in, entry.frame):set_generated()
        local elapsed = pinfo.abs_ts - entry.time
        local secs = math.floor(elapsed)
        local nsecs = math.floor((elapsed - secs) * 1e9 + 0.5)
        tree:add(f.response_time, NSTime.new(secs, nsecs)):set_generated()
    end
end

-- Walks the TLV area `tlvs` of a message of type `msg_type`; returns the Result Code and
-- whether a Service Type was present, for the message-level checks.
local function dissect_tlvs(tlvs, pinfo, tree, msg_type)
    local known_message = message_types[msg_type] ~= nil
    local offset, count = 0, 0
    local counts = {}
    local integrity_seen = false
    local result, has_service_type = nil, false
    local area = tlvs:len()
    while offset < area do
        local start = offset
        if area - offset < 2 then
            tree:add_proto_expert_info(e.malformed, "TLV length missing")
            tree:add(f.tlv_value, tlvs(offset))
            return result, has_service_type
        end
        local ty = tlvs(offset, 1):uint()
        local len = tlvs(offset + 1, 1):uint()
        local header = 2
        if len == LONG_FORM then
            if area - offset < 4 then
                tree:add_proto_expert_info(e.malformed, "TLV long length missing")
                tree:add(f.tlv_value, tlvs(offset))
                return result, has_service_type
            end
            len = tlvs(offset + 2, 2):uint()
            header = 4
        end
        local name = tlv_names[ty]
        local label = name or string.format("Unknown TLV 0x%02x", ty)
        local overrun = offset + header + len > area
        local item_len = overrun and (area - offset) or (header + len)
        local tlv_tree = tree:add(f.tlv, tlvs(offset, item_len))
        tlv_tree:set_text(label)
        tlv_tree:add(f.tlv_type, tlvs(offset, 1))
        local len_item
        if header == 4 then
            len_item = tlv_tree:add(f.tlv_len, tlvs(offset + 2, 2))
            len_item:append_text(" (long form)")
            if len < LONG_FORM then
                len_item:add_proto_expert_info(e.malformed,
                    "TLV long form used for a short value")
            end
        else
            len_item = tlv_tree:add(f.tlv_len, tlvs(offset + 1, 1))
        end
        if overrun then
            len_item:add_proto_expert_info(e.malformed, "TLV value runs past the message")
            if area - offset > header then tlv_tree:add(f.tlv_value, tlvs(offset + header)) end
            return result, has_service_type
        end
        count = count + 1
        if count == MAX_TLVS + 1 then
            tlv_tree:add_proto_expert_info(e.malformed, "more than 32 TLVs")
        end
        if integrity_seen then
            tlv_tree:add_proto_expert_info(e.malformed, "TLV after Message Integrity")
        end
        local value = len > 0 and tlvs(offset + header, len) or nil
        local rule = registry[ty]
        if rule == nil then
            if value then tlv_tree:add(f.tlv_value, value) end
            if ty >= 0x80 then
                tlv_tree:add_proto_expert_info(e.unknown_optional,
                    string.format("Unknown optional TLV 0x%02x (skipped)", ty))
            else
                tlv_tree:add_proto_expert_info(e.unknown_critical,
                    string.format("Unknown comprehension-required TLV 0x%02x", ty))
            end
        elseif not length_allowed(rule, len) then
            if value then tlv_tree:add(f.tlv_value, value) end
            len_item:add_proto_expert_info(e.malformed,
                string.format("%s: length %d not allowed", name, len))
        else
            counts[ty] = (counts[ty] or 0) + 1
            if counts[ty] > rule.max then
                tlv_tree:add_proto_expert_info(e.malformed,
                    string.format("%s repeated more than allowed (%d)", name, rule.max))
            end
            if known_message and not rule.messages[msg_type] then
                tlv_tree:add_proto_expert_info(e.malformed,
                    string.format("%s not allowed in %s", name, message_types[msg_type]))
            end
            local summary, illegal, at = rule.decode(tlv_tree, value, tlvs(offset, header))
            tlv_tree:set_text(label .. ": " .. summary)
            if illegal then
                (at or tlv_tree):add_proto_expert_info(e.illegal, "Illegal value: " .. illegal)
            end
            if ty == 0x08 then result = value:uint() end
            if ty == 0x09 then has_service_type = true end
            if ty == 0x14 then integrity_seen = true end
        end
        offset = start + header + len
    end
    return result, has_service_type
end

-- One control message (the payload of a Control envelope).
local function dissect_control(msg, pinfo, tree, endpoints)
    local n = msg:len()
    if n < CONTROL_HEADER_LEN then
        tree:add_proto_expert_info(e.truncated,
            string.format("Control message of %d octets, shorter than its 14-octet header", n))
        return "Control (truncated)"
    end
    local version = msg(0, 1):uint()
    local msg_type = msg(1, 1):uint()
    local seq = msg(2, 4):uint()
    local version_item = tree:add(f.version, msg(0, 1))
    tree:add(f.msg_type, msg(1, 1))
    local seq_item = tree:add(f.seq, msg(2, 4))
    seq_item:add(f.seq_director, msg(2, 4))
    tree:add(f.tunnel, msg(6, 8))
    local name = message_types[msg_type] or string.format("Unknown Message 0x%02x", msg_type)
    if version ~= 1 then
        version_item:add_proto_expert_info(e.version,
            string.format("Version %d; this is version 1 (PROTOCOL.md §6.1)", version))
    end
    if message_types[msg_type] == nil then
        tree:add_proto_expert_info(e.unknown_message,
            string.format("Unknown message type 0x%02x", msg_type))
    end
    if n > MAX_CONTROL_LEN then
        tree:add_proto_expert_info(e.malformed,
            string.format("Control message of %d octets, longer than 2048", n))
    end
    track_exchange(pinfo, tree, endpoints, msg_type, seq)
    local result, has_service_type = nil, false
    if n > CONTROL_HEADER_LEN then
        result, has_service_type = dissect_tlvs(msg(CONTROL_HEADER_LEN), pinfo, tree, msg_type)
    end
    if message_types[msg_type] and msg_type % 2 == 0 and result == nil then
        tree:add_proto_expert_info(e.malformed, "Response without Result Code")
    end
    if msg_type == SVC_REQ and not has_service_type then
        tree:add_proto_expert_info(e.malformed, "Client Service Request without Service Type")
    end
    local summary = string.format("%s seq=%d", name, seq)
    if result ~= nil then
        summary = summary .. " " .. name_or_unknown(result_codes, result)
    end
    if version ~= 1 then summary = summary .. " (version " .. version .. ")" end
    return summary
end

---------------------------------------------------------------------------------------------
-- Envelopes (PROTOCOL.md §2)
---------------------------------------------------------------------------------------------

local ip_dissector = Dissector.get("ip")
local ipv6_dissector = Dissector.get("ipv6")

-- Whether `payload` is one whole IPv4 or IPv6 packet (§2.2), and which dissector takes it.
local function inner_ip(payload)
    local n = payload:len()
    if n < 1 then return nil end
    local v = math.floor(payload(0, 1):uint() / 16)
    if v == 4 and n >= 20 and payload(2, 2):uint() == n then return ip_dissector end
    if v == 6 and n >= 40 and payload(4, 2):uint() + 40 == n then return ipv6_dissector end
    return nil
end

-- Columns: the Protocol column says tscftun; the Info column lists the packet's envelopes.
local function add_info(pinfo, text)
    pinfo.cols.protocol:set("tscftun")
    if pinfo.private.tscf_info then
        pinfo.cols.info:append(", " .. text)
    else
        pinfo.cols.info:set(text)
        pinfo.private.tscf_info = "1"
    end
end

-- One envelope in `tvb` (exactly its bytes on a stream; the whole datagram on a datagram
-- transport, where Length must equal the datagram's size).
local function dissect_envelope(tvb, pinfo, tree, datagram, endpoints)
    local size = tvb:len()
    local ty = tvb(0, 1):uint()
    local declared = tvb(1, 2):uint()
    local root = tree:add(tscf, tvb())
    root:add(f.type, tvb(0, 1))
    local len_item = root:add(f.len, tvb(1, 2))
    if declared < ENVELOPE_HEADER_LEN then
        len_item:add_proto_expert_info(e.framing)
        add_info(pinfo, "framing lost")
        return
    end
    local payload_end = size
    if datagram and declared ~= size then
        len_item:add_proto_expert_info(e.datagram_len,
            string.format("Envelope Length %d, datagram of %d octets (PROTOCOL.md §2.1)",
                declared, size))
        if declared < size then payload_end = declared end
    end
    local payload = payload_end > ENVELOPE_HEADER_LEN
        and tvb(ENVELOPE_HEADER_LEN, payload_end - ENVELOPE_HEADER_LEN) or nil
    if ty == ENVELOPE_CONTROL then
        if payload == nil then
            root:add_proto_expert_info(e.truncated, "Control envelope without a message")
            add_info(pinfo, "Control (empty)")
            return
        end
        local summary = dissect_control(payload, pinfo, root, endpoints)
        root:append_text(", " .. summary)
        add_info(pinfo, summary)
    elseif ty == ENVELOPE_DATA then
        local dissector = payload and inner_ip(payload)
        root:append_text(string.format(", Data (%d octets)", payload and payload:len() or 0))
        if dissector == nil then
            root:add_proto_expert_info(e.not_ip)
            if payload then root:add(f.data, payload) end
            add_info(pinfo, "Data (not an IP packet)")
            return
        end
        add_info(pinfo, "Data: ")
        -- The inner packet's dissectors write to the columns after ours.
        pinfo.cols.protocol:append("/")
        pinfo.cols.protocol:fence()
        pinfo.cols.info:fence()
        dissector:call(payload:tvb(), pinfo, tree)
    else
        root:add_proto_expert_info(e.unknown_envelope,
            string.format("Unknown envelope type 0x%02x, skipped by its Length", ty))
        add_info(pinfo, string.format("Unknown envelope 0x%02x", ty))
    end
end

-- Whether the envelope at the start of `tvb` looks like tscf (§2.4: 4 = Data, 5 = Control,
-- with a plausible length). On a datagram the length must be the datagram's.
local function plausible(tvb, datagram)
    local n = tvb:len()
    if n < ENVELOPE_HEADER_LEN then return false end
    local ty = tvb(0, 1):uint()
    local len = tvb(1, 2):uint()
    if datagram and len ~= n then return false end
    if ty == ENVELOPE_CONTROL then
        if len < ENVELOPE_HEADER_LEN + CONTROL_HEADER_LEN then return false end
        if len > ENVELOPE_HEADER_LEN + MAX_CONTROL_LEN then return false end
        return n < 4 or tvb(3, 1):uint() == 1
    elseif ty == ENVELOPE_DATA then
        if len < ENVELOPE_HEADER_LEN + 20 then return false end
        if n < 4 then return true end
        local v = math.floor(tvb(3, 1):uint() / 16)
        if v == 4 then
            return n < 7 or tvb(5, 2):uint() + ENVELOPE_HEADER_LEN == len
        elseif v == 6 then
            return n < 9 or tvb(7, 2):uint() + 40 + ENVELOPE_HEADER_LEN == len
        end
    end
    return false
end

-- The outer endpoints, taken before any inner packet's dissector rewrites pinfo's addresses.
local function outer_endpoints(pinfo)
    return {
        src = tostring(pinfo.src) .. ":" .. tostring(pinfo.src_port),
        dst = tostring(pinfo.dst) .. ":" .. tostring(pinfo.dst_port),
    }
end

-- Streams (TCP, TLS): envelopes back to back, reassembled across segments and records.
local stream_endpoints
local function stream_pdu_len(tvb, pinfo, offset)
    local len = tvb(offset + 1, 2):uint()
    if len < ENVELOPE_HEADER_LEN then
        -- Framing is lost (§2.1): the rest of the data is one broken envelope.
        return tvb:len() - offset
    end
    return len
end

local function stream_pdu(tvb, pinfo, tree)
    dissect_envelope(tvb, pinfo, tree, false, stream_endpoints)
    return tvb:len()
end

local function dissect_stream(tvb, pinfo, tree)
    stream_endpoints = outer_endpoints(pinfo)
    dissect_tcp_pdus(tvb, tree, ENVELOPE_HEADER_LEN, stream_pdu_len, stream_pdu, true)
    return tvb:len()
end

-- Datagrams (UDP, DTLS records): one envelope each.
local function dissect_datagram(tvb, pinfo, tree)
    dissect_envelope(tvb, pinfo, tree, true, outer_endpoints(pinfo))
    return tvb:len()
end

local PT_TCP = 2

local stun_dissector = Dissector.get("stun-udp")
local dtls_dissector = Dissector.get("dtls")
local quic_dissector = Dissector.get("quic")

-- The port-table entry point: TCP and TLS carry streams, UDP and DTLS datagrams. On tscf's
-- UDP port the first octet tells the protocols apart (§2.4): 0-3 STUN, 4-5 tscf, 20-63 DTLS,
-- 64-127 and 192-255 QUIC; a DTLS record (another port) carries only tscf.
function tscf.dissector(tvb, pinfo, tree)
    if tvb:len() < ENVELOPE_HEADER_LEN then return 0 end
    if pinfo.port_type == PT_TCP then return dissect_stream(tvb, pinfo, tree) end
    if pinfo.match_uint ~= tscf.prefs.udp_port then return dissect_datagram(tvb, pinfo, tree) end
    local first = tvb(0, 1):uint()
    if first == ENVELOPE_DATA or first == ENVELOPE_CONTROL then
        return dissect_datagram(tvb, pinfo, tree)
    elseif first <= 3 then
        return stun_dissector:call(tvb, pinfo, tree)
    elseif first >= 20 and first <= 63 then
        return dtls_dissector:call(tvb, pinfo, tree)
    elseif (first >= 64 and first <= 127) or first >= 192 then
        return quic_dissector:call(tvb, pinfo, tree)
    end
    return 0
end

---------------------------------------------------------------------------------------------
-- Heuristics and registration
---------------------------------------------------------------------------------------------

tscf:register_heuristic("tcp", function(tvb, pinfo, tree)
    if not plausible(tvb, false) then return false end
    -- The rest of the connection is tscf, also segments that start inside an envelope.
    pinfo.conversation = tscf
    dissect_stream(tvb, pinfo, tree)
    return true
end)

tscf:register_heuristic("udp", function(tvb, pinfo, tree)
    if not plausible(tvb, true) then return false end
    dissect_datagram(tvb, pinfo, tree)
    return true
end)

tscf:register_heuristic("tls", function(tvb, pinfo, tree)
    if not plausible(tvb, false) then return false end
    dissect_stream(tvb, pinfo, tree)
    return true
end)

tscf:register_heuristic("dtls", function(tvb, pinfo, tree)
    if not plausible(tvb, true) then return false end
    dissect_datagram(tvb, pinfo, tree)
    return true
end)

local registered = {}

local function register_ports()
    local tcp_table = DissectorTable.get("tcp.port")
    local udp_table = DissectorTable.get("udp.port")
    local tls_table = DissectorTable.get("tls.port")
    local dtls_table = DissectorTable.get("dtls.port")
    for _, r in ipairs(registered) do r.table:remove(r.port, r.dissector) end
    registered = {}
    local function add(table, port, dissector)
        if port ~= 0 then
            table:add(port, dissector)
            registered[#registered + 1] = { table = table, port = port, dissector = dissector }
        end
    end
    add(tcp_table, tscf.prefs.tcp_port, tscf)
    add(udp_table, tscf.prefs.udp_port, tscf)
    add(tcp_table, tscf.prefs.tls_port, Dissector.get("tls"))
    add(tls_table, tscf.prefs.tls_port, tscf)
    add(udp_table, tscf.prefs.dtls_port, dtls_dissector)
    add(dtls_table, tscf.prefs.dtls_port, tscf)
end

function tscf.init()
    requests = {}
end

function tscf.prefs_changed()
    register_ports()
end

register_ports()
