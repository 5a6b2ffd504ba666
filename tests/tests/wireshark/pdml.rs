//! tshark's PDML output (`-T pdml`), read into packets of fields: each field's filter name,
//! value as shown (`show`) and line as displayed (`showname`), in tree order.
//!
//! PDML puts one element per line, so a line reader is enough; attribute values are XML-escaped.

use std::fmt;

/// One `<proto>` or `<field>` element.
#[derive(Clone, Debug)]
pub struct Item {
    /// Filter name (`tscftun.msg.type`), or empty for a text-only line.
    pub name: String,
    /// The value as shown (`0x01`, `10.77.0.2`).
    pub show: String,
    /// The line as Wireshark displays it (`Message Type: Keepalive (0x07)`).
    pub showname: String,
    /// The name of the element this one sits in.
    pub parent: String,
}

/// One dissected frame.
#[derive(Clone, Debug, Default)]
pub struct Packet {
    pub items: Vec<Item>,
}

impl Packet {
    /// Every value of field `name`, in tree order.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.items
            .iter()
            .filter(|i| i.name == name)
            .map(|i| i.show.as_str())
            .collect()
    }

    /// The value of field `name`, which must appear exactly once.
    pub fn one(&self, name: &str) -> &str {
        match self.all(name).as_slice() {
            [value] => value,
            other => panic!("{name}: expected one value, found {other:?}\n{self}"),
        }
    }

    /// Whether field or protocol `name` appears.
    pub fn has(&self, name: &str) -> bool {
        self.items.iter().any(|i| i.name == name)
    }

    /// How many times protocol or field `name` appears.
    pub fn count(&self, name: &str) -> usize {
        self.items.iter().filter(|i| i.name == name).count()
    }

    /// `frame.protocols`: the layers, such as `raw:ip:udp:tscftun`.
    pub fn protocols(&self) -> &str {
        self.one("frame.protocols")
    }

    /// The expert information of the dissectors (not Wireshark's own `_ws.*` entries), by name.
    pub fn experts(&self) -> Vec<&str> {
        self.items
            .iter()
            .filter(|i| i.parent == "_ws.expert" && !i.name.starts_with("_ws."))
            .map(|i| i.name.as_str())
            .collect()
    }

    /// Whether some displayed line contains `text`.
    pub fn shows(&self, text: &str) -> bool {
        self.items.iter().any(|i| i.showname.contains(text))
    }

    /// Checks that the `(name, value)` pairs appear in this order (others may come between).
    pub fn assert_sequence(&self, expected: &[(&str, String)], context: &str) {
        let mut items = self.items.iter();
        for (name, value) in expected {
            if !items.any(|i| i.name == *name && i.show == *value) {
                panic!("{context}: {name} = {value:?} missing or out of order\n{self}");
            }
        }
    }

    /// Lua errors: the dissector threw. (Expert info of the malformed group also adds a
    /// hidden `_ws.malformed`, so that is no sign of one.)
    pub fn errors(&self) -> Vec<&Item> {
        self.items
            .iter()
            .filter(|i| {
                i.name.starts_with("_ws.lua") && i.name != "_ws.lua.fake"
                    || i.showname.contains("Lua Error")
            })
            .collect()
    }
}

impl fmt::Display for Packet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for i in &self.items {
            if i.parent == "geninfo" || i.name.starts_with("frame.") && i.name != "frame.protocols"
            {
                continue;
            }
            writeln!(f, "  {} = {:?}  [{}]", i.name, i.show, i.showname)?;
        }
        Ok(())
    }
}

/// The packets of a PDML document.
pub fn parse(pdml: &str) -> Vec<Packet> {
    let mut packets = Vec::new();
    let mut packet = Packet::default();
    let mut open: Vec<String> = Vec::new();
    for line in pdml.lines().map(str::trim) {
        if line == "<packet>" {
            packet = Packet::default();
            open.clear();
        } else if line == "</packet>" {
            packets.push(std::mem::take(&mut packet));
        } else if line.starts_with("<proto ") || line.starts_with("<field ") {
            let name = attribute(line, "name").unwrap_or_default();
            packet.items.push(Item {
                show: attribute(line, "show").unwrap_or_default(),
                showname: attribute(line, "showname").unwrap_or_default(),
                parent: open.last().cloned().unwrap_or_default(),
                name: name.clone(),
            });
            if !line.ends_with("/>") {
                open.push(name);
            }
        } else if line == "</proto>" || line == "</field>" {
            open.pop();
        }
    }
    packets
}

/// The value of attribute `key` in one element's line, unescaped.
fn attribute(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!(" {key}=\""))? + key.len() + 3;
    let end = start + line[start..].find('"')?;
    Some(unescape(&line[start..end]))
}

fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let Some(semi) = rest.find(';') else { break };
        let entity = &rest[1..semi];
        let decoded = match entity {
            "quot" => Some('"'),
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "apos" => Some('\''),
            _ => entity
                .strip_prefix("#x")
                .and_then(|hex| u32::from_str_radix(hex, 16).ok())
                .or_else(|| entity.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}
