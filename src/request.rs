//! The request attributes the config can look at, and a per-request view that reads each one from
//! the host at most once.
//!
//! Every attribute read crosses into Envoy, which calls back into the guest allocator and copies
//! the value. So the config is compiled into an [`AttributePlan`] (each distinct attribute once,
//! addressed by a small [`AttributeId`]), and a [`RequestView`] fetches an attribute only when a
//! matcher or a policy first asks for it, then keeps the host's buffer until the request is done.
//! When the plan names more than one header, the first header asked for brings all of them in
//! one host call (the whole header map, `get_header_map_pairs`), parsed in place: one crossing
//! and one host buffer instead of one of each per header. With a single header a single read
//! copies less for the same one call. The view's slots live in a per-worker [`Scratch`] that is
//! sized at configure time, so the view itself allocates nothing.

use core::fmt;

pub use crate::wire::{encode_header_map, HeaderPairs};

/// Something about a request that a route or a policy can look at.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Attribute {
    /// A request header by lowercase name. The pseudo-headers `:path`, `:method` and `:authority`
    /// are headers too.
    Header(String),
    /// An Envoy property, e.g. `xds.route_name`.
    Property(PropertyPath),
}

/// A property path in the proxy-wasm wire form: segments joined by NUL bytes. It is built once at
/// configure time so that reading a property on the request path builds nothing.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PropertyPath(Vec<u8>);

impl PropertyPath {
    pub fn new(segments: &[&str]) -> Self {
        PropertyPath(segments.join("\0").into_bytes())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for PropertyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dotted: String = self
            .0
            .iter()
            .map(|&b| if b == 0 { '.' } else { char::from(b) })
            .collect();
        write!(f, "{dotted}")
    }
}

impl Attribute {
    pub fn header(name: &str) -> Self {
        Attribute::Header(name.to_ascii_lowercase())
    }

    pub fn path() -> Self {
        Attribute::Header(":path".to_owned())
    }

    pub fn method() -> Self {
        Attribute::Header(":method".to_owned())
    }

    pub fn authority() -> Self {
        Attribute::Header(":authority".to_owned())
    }

    /// The name of the Envoy route the request matched (`xds.route_name`).
    pub fn route_name() -> Self {
        Attribute::Property(PropertyPath::new(&["xds", "route_name"]))
    }

    /// The downstream peer's address with its port (`source.address`).
    pub fn client_address() -> Self {
        Attribute::Property(PropertyPath::new(&["source", "address"]))
    }

    /// The upstream cluster Envoy chose for the request (`xds.cluster_name`).
    pub fn cluster_name() -> Self {
        Attribute::Property(PropertyPath::new(&["xds", "cluster_name"]))
    }

    /// An `xds.*` property: what Envoy's route match decided.
    pub fn describes_routing(&self) -> bool {
        matches!(self, Attribute::Property(path) if path.as_bytes().starts_with(b"xds\0"))
    }
}

/// Index of an attribute in the [`AttributePlan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AttributeId(u16);

impl AttributeId {
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

/// The distinct attributes one compiled config reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttributePlan {
    attributes: Vec<Attribute>,
}

/// More distinct attributes than an [`AttributeId`] can address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyAttributes;

impl fmt::Display for TooManyAttributes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "expected at most {} distinct request attributes",
            u16::MAX
        )
    }
}

impl AttributePlan {
    /// Returns the id of `attribute`, adding it if this is the first time it is seen.
    pub fn intern(&mut self, attribute: Attribute) -> Result<AttributeId, TooManyAttributes> {
        if let Some(position) = self.attributes.iter().position(|a| *a == attribute) {
            return u16::try_from(position)
                .map(AttributeId)
                .map_err(|_| TooManyAttributes);
        }
        let id = u16::try_from(self.attributes.len()).map_err(|_| TooManyAttributes)?;
        self.attributes.push(attribute);
        Ok(AttributeId(id))
    }

    pub fn get(&self, id: AttributeId) -> Option<&Attribute> {
        self.attributes.get(id.index())
    }

    pub fn len(&self) -> usize {
        self.attributes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.attributes.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Attribute> {
        self.attributes.iter()
    }

    /// Whether the request's headers are read in one call of the whole map: when more than one
    /// header is in the plan.
    pub fn reads_header_map(&self) -> bool {
        self.attributes
            .iter()
            .filter(|a| matches!(a, Attribute::Header(_)))
            .nth(1)
            .is_some()
    }
}

/// Where attribute values come from: Envoy in the plugin, a table in tests.
pub trait AttributeSource {
    /// Reads one attribute: one host call. `None` when the request does not have it.
    fn read(&mut self, attribute: &Attribute) -> Option<Vec<u8>>;
    /// Reads every request header at once, in proxy-wasm's map wire form (see
    /// [`HeaderPairs`]): one host call. `None` when the source cannot, and single reads are made.
    fn read_header_map(&mut self) -> Option<Vec<u8>> {
        None
    }
    /// Removes a request header before the request goes on: one host call.
    fn remove_header(&mut self, name: &str);
}

#[derive(Debug, Default)]
enum Slot {
    #[default]
    Unread,
    Absent,
    Present(Vec<u8>),
    /// A value inside the request's header map: `start..end` of [`Scratch`]'s map buffer.
    InMap {
        start: u32,
        end: u32,
    },
}

/// Per-worker storage for one request's attribute values, reused from request to request.
#[derive(Debug, Default)]
pub struct Scratch {
    slots: Vec<Slot>,
    /// The request's header map as the host returned it, while the request is decided.
    header_map: Vec<u8>,
    header_map_read: bool,
}

impl Scratch {
    /// Sized for `plan` at configure time, so that requests never grow it.
    pub fn for_plan(plan: &AttributePlan) -> Self {
        let mut slots = Vec::new();
        slots.resize_with(plan.len(), Slot::default);
        Scratch {
            slots,
            header_map: Vec::new(),
            header_map_read: false,
        }
    }

    fn value(&self, slot: usize) -> Option<&[u8]> {
        match self.slots.get(slot)? {
            Slot::Present(value) => Some(value.as_slice()),
            Slot::InMap { start, end } => self.header_map.get(*start as usize..*end as usize),
            Slot::Absent | Slot::Unread => None,
        }
    }
}

/// One request's attributes, read lazily and at most once each.
pub struct RequestView<'a, S: AttributeSource> {
    plan: &'a AttributePlan,
    source: &'a mut S,
    scratch: &'a mut Scratch,
    /// A request header was removed. Envoy then matches its route again only when the router
    /// asks, so until this callback returns its `xds.*` properties still describe the route it
    /// chose before: they are not read, and count as absent.
    routing_stale: bool,
}

impl<'a, S: AttributeSource> RequestView<'a, S> {
    /// A scratch sized for another plan (a config swap mid-flight) is resized; that allocation
    /// happens once per swap, never per request in steady state.
    pub fn new(plan: &'a AttributePlan, source: &'a mut S, scratch: &'a mut Scratch) -> Self {
        if scratch.slots.len() != plan.len() {
            scratch.slots.resize_with(plan.len(), Slot::default);
        }
        scratch.clear();
        RequestView {
            plan,
            source,
            scratch,
            routing_stale: false,
        }
    }

    /// An attribute already read by [`RequestView::get`], without reading it. Lets a caller hold
    /// several attributes at once: `get` each, then `peek` them all.
    pub fn peek(&self, id: AttributeId) -> Option<&[u8]> {
        self.scratch.value(id.index())
    }

    /// The attribute's raw bytes, or `None` if the request lacks it (or the id is not in the plan).
    pub fn get(&mut self, id: AttributeId) -> Option<&[u8]> {
        let index = id.index();
        if matches!(self.scratch.slots.get(index)?, Slot::Unread) {
            let attribute = self.plan.get(id)?;
            let is_header = matches!(attribute, Attribute::Header(_));
            if is_header && !self.scratch.header_map_read && self.plan.reads_header_map() {
                self.read_header_map();
            }
            if matches!(self.scratch.slots.get(index)?, Slot::Unread) {
                let value = if self.routing_stale && attribute.describes_routing() {
                    Slot::Absent
                } else {
                    match self.source.read(attribute) {
                        Some(value) => Slot::Present(value),
                        None => Slot::Absent,
                    }
                };
                *self.scratch.slots.get_mut(index)? = value;
            }
        }
        self.scratch.value(index)
    }

    /// Reads every header at once and settles every header slot still unread: found in the map,
    /// or absent. The first value of a header sent twice counts, as with a single read. When the
    /// source cannot read the map, the slots stay unread and are read one by one.
    fn read_header_map(&mut self) {
        self.scratch.header_map_read = true;
        let Some(map) = self.source.read_header_map() else {
            return;
        };
        let scratch = &mut *self.scratch;
        for (name, range) in HeaderPairs::new(&map) {
            let (Ok(start), Ok(end)) = (u32::try_from(range.start), u32::try_from(range.end))
            else {
                break;
            };
            for (attribute, slot) in self.plan.iter().zip(scratch.slots.iter_mut()) {
                if let (Attribute::Header(wanted), Slot::Unread) = (attribute, &*slot) {
                    if wanted.as_bytes() == name {
                        *slot = Slot::InMap { start, end };
                    }
                }
            }
        }
        for (attribute, slot) in self.plan.iter().zip(scratch.slots.iter_mut()) {
            if matches!(attribute, Attribute::Header(_)) && matches!(slot, Slot::Unread) {
                *slot = Slot::Absent;
            }
        }
        scratch.header_map = map;
    }
}

impl Scratch {
    fn clear(&mut self) {
        for slot in self.slots.iter_mut() {
            *slot = Slot::Unread;
        }
        self.header_map = Vec::new();
        self.header_map_read = false;
    }
}

impl<S: AttributeSource> RequestView<'_, S> {
    /// Removes a request header (an attribute that is not a header is left alone), so that
    /// nothing after seawall sees it: Envoy matches its route again once a filter changes the
    /// request's headers. Later reads see it absent, without asking the host.
    pub fn remove_header(&mut self, id: AttributeId) {
        let Some(Attribute::Header(name)) = self.plan.get(id) else {
            return;
        };
        self.source.remove_header(name);
        self.routing_stale = true;
        if let Some(slot) = self.scratch.slots.get_mut(id.index()) {
            *slot = Slot::Absent;
        }
    }
}

impl<S: AttributeSource> Drop for RequestView<'_, S> {
    /// Hands the host's buffers back as soon as the request's decisions are made.
    fn drop(&mut self) {
        self.scratch.clear();
    }
}

/// A table of attribute values, for tests. It counts its reads so tests can show that each
/// attribute crosses the host boundary at most once.
#[derive(Debug, Default, Clone)]
pub struct FakeRequest {
    values: Vec<(Attribute, Vec<u8>)>,
    pub reads: Vec<Attribute>,
    /// Whether it answers [`AttributeSource::read_header_map`], as Envoy does (off: single reads).
    serves_header_map: bool,
    /// How many times the whole header map was read.
    pub header_map_reads: usize,
    /// The headers removed, in order, each with how many reads had been made before it.
    pub removed: Vec<(String, usize)>,
}

impl FakeRequest {
    pub fn new() -> Self {
        FakeRequest::default()
    }

    pub fn with(mut self, attribute: Attribute, value: impl AsRef<[u8]>) -> Self {
        self.values.push((attribute, value.as_ref().to_vec()));
        self
    }

    /// `:method` and `:path`, as every HTTP request has.
    pub fn http(method: &str, path: &str) -> Self {
        FakeRequest::new()
            .with(Attribute::method(), method)
            .with(Attribute::path(), path)
    }

    pub fn header(self, name: &str, value: impl AsRef<[u8]>) -> Self {
        self.with(Attribute::header(name), value)
    }

    /// Serves the whole header map in one read, as Envoy does.
    pub fn serving_header_map(mut self) -> Self {
        self.serves_header_map = true;
        self
    }
}

impl AttributeSource for FakeRequest {
    fn read(&mut self, attribute: &Attribute) -> Option<Vec<u8>> {
        self.reads.push(attribute.clone());
        self.values
            .iter()
            .find(|(a, _)| a == attribute)
            .map(|(_, v)| v.clone())
    }

    fn read_header_map(&mut self) -> Option<Vec<u8>> {
        if !self.serves_header_map {
            return None;
        }
        self.header_map_reads += 1;
        let headers = self
            .values
            .iter()
            .filter_map(|(attribute, value)| match attribute {
                Attribute::Header(name) => Some((name.as_bytes(), value.as_slice())),
                Attribute::Property(_) => None,
            });
        Some(encode_header_map(headers))
    }

    fn remove_header(&mut self, name: &str) {
        let header = Attribute::header(name);
        self.values.retain(|(attribute, _)| *attribute != header);
        self.removed.push((name.to_owned(), self.reads.len()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn interning_deduplicates() {
        let mut plan = AttributePlan::default();
        let a = plan.intern(Attribute::header("X-User")).unwrap();
        let b = plan.intern(Attribute::path()).unwrap();
        let c = plan.intern(Attribute::header("x-user")).unwrap();
        assert_eq!(a, c);
        assert_ne!(a, b);
        assert_eq!(plan.len(), 2);
    }

    #[test]
    fn each_attribute_is_read_at_most_once() {
        let mut plan = AttributePlan::default();
        let user = plan.intern(Attribute::header("x-user")).unwrap();
        let tier = plan.intern(Attribute::header("x-tier")).unwrap();
        let mut source = FakeRequest::new().header("x-user", "alice");
        let mut scratch = Scratch::for_plan(&plan);
        {
            let mut view = RequestView::new(&plan, &mut source, &mut scratch);
            assert_eq!(view.get(user), Some(&b"alice"[..]));
            assert_eq!(view.get(user), Some(&b"alice"[..]));
            assert_eq!(view.get(tier), None);
            assert_eq!(view.get(tier), None);
        }
        assert_eq!(
            source.reads,
            vec![Attribute::header("x-user"), Attribute::header("x-tier")]
        );
    }

    #[test]
    fn the_next_request_reads_afresh() {
        let mut plan = AttributePlan::default();
        let user = plan.intern(Attribute::header("x-user")).unwrap();
        let mut scratch = Scratch::for_plan(&plan);
        let mut first = FakeRequest::new().header("x-user", "alice");
        assert_eq!(
            RequestView::new(&plan, &mut first, &mut scratch).get(user),
            Some(&b"alice"[..])
        );
        let mut second = FakeRequest::new().header("x-user", "bob");
        assert_eq!(
            RequestView::new(&plan, &mut second, &mut scratch).get(user),
            Some(&b"bob"[..])
        );
    }

    #[test]
    fn property_paths_use_the_wire_form() {
        let Attribute::Property(path) = Attribute::route_name() else {
            unreachable!("route_name is a property")
        };
        assert_eq!(path.as_bytes(), b"xds\0route_name");
        assert_eq!(format!("{path:?}"), "xds.route_name");
    }

    #[test]
    fn several_headers_cost_one_read_of_the_map_and_properties_stay_single() {
        let mut plan = AttributePlan::default();
        let user = plan.intern(Attribute::header("x-user")).unwrap();
        let tier = plan.intern(Attribute::header("x-tier")).unwrap();
        let path = plan.intern(Attribute::path()).unwrap();
        let route = plan.intern(Attribute::route_name()).unwrap();
        let mut source = FakeRequest::http("GET", "/items")
            .header("x-user", "alice")
            .with(Attribute::route_name(), "items")
            .serving_header_map();
        let mut scratch = Scratch::for_plan(&plan);
        {
            let mut view = RequestView::new(&plan, &mut source, &mut scratch);
            assert_eq!(view.get(user), Some(&b"alice"[..]));
            assert_eq!(view.get(tier), None);
            assert_eq!(view.get(path), Some(&b"/items"[..]));
            assert_eq!(view.get(route), Some(&b"items"[..]));
            assert_eq!(view.peek(user), Some(&b"alice"[..]));
        }
        assert_eq!(source.header_map_reads, 1);
        assert_eq!(source.reads, vec![Attribute::route_name()]);
    }

    #[test]
    fn a_single_header_is_read_alone() {
        let mut plan = AttributePlan::default();
        let user = plan.intern(Attribute::header("x-user")).unwrap();
        let mut source = FakeRequest::new()
            .header("x-user", "bob")
            .serving_header_map();
        let mut scratch = Scratch::for_plan(&plan);
        assert_eq!(
            RequestView::new(&plan, &mut source, &mut scratch).get(user),
            Some(&b"bob"[..])
        );
        assert_eq!(source.header_map_reads, 0);
        assert_eq!(source.reads, vec![Attribute::header("x-user")]);
    }

    #[test]
    fn a_header_sent_twice_counts_its_first_value_and_a_removed_one_is_gone() {
        let mut plan = AttributePlan::default();
        let user = plan.intern(Attribute::header("x-user")).unwrap();
        let spoof = plan.intern(Attribute::header("x-seawall-cluster")).unwrap();
        let mut source = FakeRequest::new()
            .header("x-seawall-cluster", "internal")
            .header("x-user", "first")
            .header("x-user", "second")
            .serving_header_map();
        let mut scratch = Scratch::for_plan(&plan);
        let mut view = RequestView::new(&plan, &mut source, &mut scratch);
        assert_eq!(view.get(spoof), Some(&b"internal"[..]));
        view.remove_header(spoof);
        assert_eq!(view.get(spoof), None);
        assert_eq!(view.get(user), Some(&b"first"[..]));
    }

    #[test]
    fn the_next_request_reads_the_map_afresh() {
        let mut plan = AttributePlan::default();
        let user = plan.intern(Attribute::header("x-user")).unwrap();
        let _tier = plan.intern(Attribute::header("x-tier")).unwrap();
        let mut scratch = Scratch::for_plan(&plan);
        let mut first = FakeRequest::new()
            .header("x-user", "alice")
            .serving_header_map();
        assert_eq!(
            RequestView::new(&plan, &mut first, &mut scratch).get(user),
            Some(&b"alice"[..])
        );
        let mut second = FakeRequest::new()
            .header("x-tier", "gold")
            .serving_header_map();
        assert_eq!(
            RequestView::new(&plan, &mut second, &mut scratch).get(user),
            None
        );
        assert_eq!(second.header_map_reads, 1);
    }

    #[test]
    fn header_pairs_decode_what_was_encoded() {
        let pairs: Vec<(&[u8], &[u8])> =
            vec![(b":path", b"/a"), (b"x-empty", b""), (b"k", b"v\xff")];
        let map = encode_header_map(pairs.iter().copied());
        let decoded: Vec<(&[u8], &[u8])> = HeaderPairs::new(&map)
            .map(|(name, range)| (name, &map[range]))
            .collect();
        assert_eq!(decoded, pairs);
    }

    #[test]
    fn a_malformed_header_map_yields_only_what_it_holds_and_never_panics() {
        let map = encode_header_map([(&b"x-user"[..], &b"alice"[..])].into_iter());
        // Every truncation and every single-byte corruption.
        for end in 0..map.len() {
            let _ = HeaderPairs::new(&map[..end]).count();
        }
        for at in 0..map.len() {
            for byte in [0u8, 1, 0x7f, 0xff] {
                let mut bad = map.clone();
                bad[at] = byte;
                for (_, range) in HeaderPairs::new(&bad) {
                    assert!(range.end < bad.len());
                }
            }
        }
        // A count far beyond the buffer reads nothing.
        let mut huge = map.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(HeaderPairs::new(&huge).count(), 0);
    }
}
