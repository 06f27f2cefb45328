//! Subscription query filters: the `queries` of an Appwrite realtime subscription, compiled once
//! at subscribe time and evaluated against each event's `payload`.
//!
//! Owns the query language a subscription may carry: parsing a query string the way Appwrite's
//! query parser does (with its error texts), the realtime restrictions (the allowed methods, and
//! `select` only as `select(["*"])`), evaluation, the canonical strings Appwrite echoes in
//! `response/subscribe`, and the limits on what one subscription may hold. It knows no
//! connections, sockets, channels, roles or protocol messages: callers hand it query strings and
//! payloads, and get back a [`Filter`], a [`FilterError`] whose text is what the client is told,
//! and booleans. It must not decide what a failed compile does to a connection.
//!
//! # Semantics (Appwrite's realtime query filter, and where herald differs)
//!
//! * The queries of one subscription AND together. An empty list, or any top-level
//!   `select(["*"])`, matches every event whatever the other queries say (Appwrite checks for a
//!   select-all first). A `select(["*"])` nested in `and`/`or` matches nothing, as in Appwrite
//!   (it is evaluated as a lookup of an empty attribute).
//! * `equal` matches if the attribute equals any value; `notEqual` if it equals none of them;
//!   the ordering methods if the comparison holds for any value. `and([])` matches, `or([])`
//!   does not.
//! * A missing attribute matches nothing, `isNull`, `isNotNull` and `notEqual` included: Appwrite
//!   requires the key to be present for every method. `isNull` matches a present `null`,
//!   `isNotNull` a present non-null value.
//! * Equality is strict, as PHP's `===`: a number never equals a string, a boolean only equals a
//!   boolean, `null` only `null`, an array attribute only an identical array (`equal` is not
//!   "contains"). One difference: numbers are compared by value, so `1` equals `1.0` (PHP's
//!   `===` tells int from float; herald does not, since JSON does not either).
//! * Numbers compare exactly when both are integers (beyond 2^53 too), otherwise as `f64`.
//! * Ordering follows PHP 8's `<`: two strings compare numerically when both are numeric strings
//!   (`"9" < "10"`, as Appwrite's own tests assert), otherwise byte-wise; a number and a numeric
//!   string compare numerically; `false < true`. Comparisons PHP would make by converting to
//!   booleans or to a number's decimal text (null, arrays, objects, a number against a
//!   non-numeric string, a boolean against a non-boolean) match nothing here.
//! * Attributes are looked up as a top-level key first (Appwrite looks up nothing else). If no
//!   such key exists and the attribute has dots, `a.b.c` walks nested objects (not arrays).
//! * `values` given as a JSON object are read as the list of its member values, as PHP reads
//!   them (here in key order: serde_json keeps object keys sorted).
//! * Errors are Appwrite's texts: the query parser's first (for every query, in order), then the
//!   realtime checks, walked in Appwrite's order (last query first, depth first).
//!   A subscribe message's error is Appwrite's `Invalid query: ` followed by this text; a
//!   Gen B URL slot's error is this text alone. Appwrite raises the `select` error as a
//!   different kind of exception, which its subscribe handler does not turn into `Invalid
//!   query:` (it becomes a generic server error there). The limits ([`FilterLimits`]) and their
//!   texts are herald's own.
//! * An empty payload is a payload like any other. (Appwrite drops an event with an empty
//!   payload for every subscription but one whose first query is `select(["*"])`, a side
//!   effect of PHP treating an empty array as false.)

use std::cmp::Ordering;
use std::fmt::Write as _;

use serde_json::{Map, Number, Value};

/// The methods a realtime query may use, in the order Appwrite lists them in its error.
pub const ALLOWED_METHODS: &str = "equal, notEqual, lessThan, lessThanEqual, greaterThan, greaterThanEqual, isNull, isNotNull, and, or, select";

/// What one subscription's queries may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilterLimits {
    /// Queries per subscription (top level).
    pub max_queries: usize,
    /// Levels of `and`/`or` nesting.
    pub max_depth: usize,
    /// Entries in one query's `values` (nested queries of `and`/`or` included).
    pub max_values: usize,
    /// Bytes of one attribute name.
    pub max_attribute_bytes: usize,
    /// Bytes of one query string.
    pub max_query_bytes: usize,
}

impl Default for FilterLimits {
    fn default() -> Self {
        FilterLimits {
            max_queries: 100,
            max_depth: 5,
            max_values: 100,
            max_attribute_bytes: 256,
            max_query_bytes: 4096,
        }
    }
}

/// Why a subscription's queries were refused. `Display` is the exact message for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// Not JSON; the text is PHP's `json_decode` error.
    #[error("Invalid query: {0}")]
    Json(&'static str),
    /// JSON, but not an object (the type as PHP names it).
    #[error("Invalid query. Must be an array, got {0}")]
    NotAnObject(&'static str),
    /// An already-decoded query that is neither a string nor an object.
    #[error("Invalid query. Must be a string, got {0}")]
    NotAString(&'static str),
    #[error("Invalid query method. Must be a string, got {0}")]
    MethodNotString(&'static str),
    /// Not a method of Appwrite's query language at all.
    #[error("Invalid query method: {0}")]
    UnknownMethod(String),
    #[error("Invalid query attribute. Must be a string, got {0}")]
    AttributeNotString(&'static str),
    #[error("Invalid query values. Must be an array, got {0}")]
    ValuesNotArray(&'static str),
    #[error("Invalid nested query. Must be an array or string, got {0}")]
    NestedNotQuery(&'static str),
    /// A method of the query language that realtime queries do not allow.
    #[error(
        "Query method '{0}' is not supported in Realtime queries. Allowed query methods are: {allowed}",
        allowed = ALLOWED_METHODS
    )]
    Unsupported(String),
    #[error(
        "Only select(\"*\") is allowed in Realtime queries. select(\"*\") means \"listen to all events\"."
    )]
    SelectNotAll,
    #[error("Too many queries: a subscription may carry at most {0} queries")]
    TooManyQueries(usize),
    #[error("Query is too long: a query may be at most {0} bytes")]
    QueryTooLong(usize),
    #[error("Query is nested too deeply: and/or may nest at most {0} levels")]
    TooDeep(usize),
    #[error("Too many values: a query may carry at most {0} values")]
    TooManyValues(usize),
    #[error("Attribute is too long: an attribute name may be at most {0} bytes")]
    AttributeTooLong(usize),
}

/// A subscription's compiled queries. Cheap to hold: a flag and a boxed tree of pre-converted
/// values and pre-split attribute paths.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    select_all: bool,
    nodes: Box<[Node]>,
}

impl Default for Filter {
    /// Matches every event (no queries).
    fn default() -> Self {
        Filter {
            select_all: true,
            nodes: Box::new([]),
        }
    }
}

impl Filter {
    /// Compiles a subscription's query strings (each a JSON-encoded query). Empty = select all.
    pub fn compile<S: AsRef<str>>(
        queries: &[S],
        limits: &FilterLimits,
    ) -> Result<Filter, FilterError> {
        if queries.len() > limits.max_queries {
            return Err(FilterError::TooManyQueries(limits.max_queries));
        }
        let raw = queries
            .iter()
            .map(|q| parse_str(q.as_ref(), 0, limits))
            .collect::<Result<Vec<_>, _>>()?;
        Self::build(raw)
    }

    /// Compiles queries as a decoded subscribe message holds them: each a JSON string (as
    /// clients send them) or, leniently, an object that is already the decoded query.
    pub fn compile_values(queries: &[Value], limits: &FilterLimits) -> Result<Filter, FilterError> {
        if queries.len() > limits.max_queries {
            return Err(FilterError::TooManyQueries(limits.max_queries));
        }
        let raw = queries
            .iter()
            .map(|q| match q {
                Value::String(s) => parse_str(s, 0, limits),
                Value::Object(_) => {
                    if encoded_len(q) > limits.max_query_bytes {
                        return Err(FilterError::QueryTooLong(limits.max_query_bytes));
                    }
                    parse_decoded(q, 0, limits)
                }
                other => Err(FilterError::NotAString(php_type(other))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::build(raw)
    }

    /// True if this filter lets every event through: no queries, or a top-level `select(["*"])`.
    pub fn is_select_all(&self) -> bool {
        self.select_all
    }

    /// What evaluating this filter costs per event, and roughly what it holds: one per query
    /// and per value, nested ones included. Bounded per connection by the caller.
    pub fn weight(&self) -> usize {
        fn node(n: &Node) -> usize {
            match n {
                Node::Leaf(l) => 1 + l.values.len(),
                Node::And(g) | Node::Or(g) => 1 + g.children.iter().map(node).sum::<usize>(),
                Node::Select(_) => 1,
            }
        }
        if self.select_all {
            return 0;
        }
        self.nodes.iter().map(node).sum()
    }

    /// Whether an event with this `payload` reaches the subscription.
    pub fn matches(&self, payload: &Value) -> bool {
        self.select_all || self.nodes.iter().all(|n| n.eval(payload))
    }

    /// The query strings Appwrite echoes in `response/subscribe`: each query re-encoded the way
    /// Appwrite's `Query::toString` does (PHP's `json_encode`), `[]` for no queries.
    pub fn canonical(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| {
                let mut out = String::new();
                n.write(&mut out);
                out
            })
            .collect()
    }

    /// Appwrite's realtime checks over parsed queries, then the compiled tree.
    fn build(raw: Vec<Raw>) -> Result<Filter, FilterError> {
        // Appwrite pops the last query first and pushes an and/or's children on the stack.
        let mut stack: Vec<&Raw> = raw.iter().collect();
        while let Some(q) = stack.pop() {
            match q.method.as_str() {
                "and" | "or" => stack.extend(q.children.iter()),
                "select" if !q.is_select_all() => return Err(FilterError::SelectNotAll),
                "select" | "equal" | "notEqual" | "lessThan" | "lessThanEqual" | "greaterThan"
                | "greaterThanEqual" | "isNull" | "isNotNull" => {}
                other => return Err(FilterError::Unsupported(other.to_owned())),
            }
        }
        let select_all = raw.is_empty() || raw.iter().any(|q| q.method == "select");
        let nodes = raw.into_iter().map(Node::compile).collect();
        Ok(Filter { select_all, nodes })
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing (the query parser's rules and texts)

/// A parsed query, before the realtime checks.
struct Raw {
    method: String,
    attribute: String,
    /// `values` of a non-logical query.
    values: Vec<Value>,
    /// Parsed `values` of a logical query (`and`, `or`, `elemMatch`).
    children: Vec<Raw>,
}

impl Raw {
    fn is_select_all(&self) -> bool {
        matches!(self.values.as_slice(), [Value::String(s)] if s == "*")
    }
}

/// Every method of Appwrite's query language (its parser refuses anything else).
fn is_query_method(m: &str) -> bool {
    matches!(
        m,
        "equal"
            | "notEqual"
            | "lessThan"
            | "lessThanEqual"
            | "greaterThan"
            | "greaterThanEqual"
            | "contains"
            | "containsAny"
            | "containsAll"
            | "notContains"
            | "search"
            | "notSearch"
            | "orderAsc"
            | "orderDesc"
            | "orderRandom"
            | "limit"
            | "offset"
            | "cursorAfter"
            | "cursorBefore"
            | "isNull"
            | "isNotNull"
            | "between"
            | "notBetween"
            | "startsWith"
            | "notStartsWith"
            | "endsWith"
            | "notEndsWith"
            | "crosses"
            | "notCrosses"
            | "distanceEqual"
            | "distanceNotEqual"
            | "distanceGreaterThan"
            | "distanceLessThan"
            | "intersects"
            | "notIntersects"
            | "overlaps"
            | "notOverlaps"
            | "touches"
            | "notTouches"
            | "or"
            | "and"
            | "elemMatch"
            | "select"
            | "vectorDot"
            | "vectorCosine"
            | "vectorEuclidean"
            | "exists"
            | "notExists"
    )
}

/// Methods whose `values` are nested queries.
fn is_logical(m: &str) -> bool {
    matches!(m, "and" | "or" | "elemMatch")
}

fn parse_str(text: &str, depth: usize, limits: &FilterLimits) -> Result<Raw, FilterError> {
    if text.len() > limits.max_query_bytes {
        return Err(FilterError::QueryTooLong(limits.max_query_bytes));
    }
    let value: Value = serde_json::from_str(text).map_err(|e| json_error(&e, limits))?;
    parse_decoded(&value, depth, limits)
}

/// PHP's `json_decode` message for what serde_json refused.
fn json_error(e: &serde_json::Error, limits: &FilterLimits) -> FilterError {
    let text = e.to_string();
    if text.contains("recursion limit") {
        FilterError::TooDeep(limits.max_depth)
    } else if text.contains("control character") {
        FilterError::Json("Control character error, possibly incorrectly encoded")
    } else if text.contains("surrogate") {
        FilterError::Json("Single unpaired UTF-16 surrogate in unicode escape")
    } else {
        FilterError::Json("Syntax error")
    }
}

fn parse_decoded(value: &Value, depth: usize, limits: &FilterLimits) -> Result<Raw, FilterError> {
    match value {
        Value::Object(map) => parse_object(map, depth, limits),
        // PHP decodes a list to an array too; it has no `method` key, so the method is ''.
        Value::Array(_) => Err(FilterError::UnknownMethod(String::new())),
        other => Err(FilterError::NotAnObject(php_type(other))),
    }
}

fn parse_object(
    map: &Map<String, Value>,
    depth: usize,
    limits: &FilterLimits,
) -> Result<Raw, FilterError> {
    // PHP reads each field with `?? ''` / `?? []`: absent and null are the same.
    let method = match map.get("method") {
        None | Some(Value::Null) => "",
        Some(Value::String(s)) => s.as_str(),
        Some(other) => return Err(FilterError::MethodNotString(php_type(other))),
    };
    if !is_query_method(method) {
        return Err(FilterError::UnknownMethod(method.to_owned()));
    }
    let attribute = match map.get("attribute") {
        None | Some(Value::Null) => "",
        Some(Value::String(s)) => s.as_str(),
        Some(other) => return Err(FilterError::AttributeNotString(php_type(other))),
    };
    if attribute.len() > limits.max_attribute_bytes {
        return Err(FilterError::AttributeTooLong(limits.max_attribute_bytes));
    }
    // A JSON object is an array to PHP: its member values, in order, are the values.
    let values: Vec<&Value> = match map.get("values") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list.iter().collect(),
        Some(Value::Object(members)) => members.values().collect(),
        Some(other) => return Err(FilterError::ValuesNotArray(php_type(other))),
    };
    if values.len() > limits.max_values {
        return Err(FilterError::TooManyValues(limits.max_values));
    }
    let mut raw = Raw {
        method: method.to_owned(),
        attribute: attribute.to_owned(),
        values: Vec::new(),
        children: Vec::new(),
    };
    if is_logical(method) {
        if depth + 1 > limits.max_depth {
            return Err(FilterError::TooDeep(limits.max_depth));
        }
        for v in values {
            raw.children.push(match v {
                Value::String(s) => parse_str(s, depth + 1, limits)?,
                Value::Object(_) | Value::Array(_) => parse_decoded(v, depth + 1, limits)?,
                other => return Err(FilterError::NestedNotQuery(php_type(other))),
            });
        }
    } else {
        raw.values = values.into_iter().cloned().collect();
    }
    Ok(raw)
}

/// The type name PHP's `gettype` gives a decoded JSON value.
fn php_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "NULL",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() => "integer",
        // Integers beyond i64 decode to floats in PHP.
        Value::Number(_) => "double",
        Value::String(_) => "string",
        Value::Array(_) | Value::Object(_) => "array",
    }
}

/// Length of a value's compact JSON encoding.
fn encoded_len(v: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing to a counter cannot fail.
    let _ = serde_json::to_writer(&mut count, v);
    count.0
}

// ---------------------------------------------------------------------------------------------
// The compiled tree

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Leaf(Leaf),
    And(Group),
    Or(Group),
    /// `select(["*"])`; at the top level it makes the filter select-all, nested it matches
    /// nothing. Holds its attribute, for the echo.
    Select(Box<str>),
}

#[derive(Debug, Clone, PartialEq)]
struct Group {
    /// Unused by evaluation; kept for the echo.
    attribute: Box<str>,
    children: Box<[Node]>,
}

#[derive(Debug, Clone, PartialEq)]
struct Leaf {
    op: Op,
    path: Path,
    /// For `isNull`/`isNotNull`, unused by evaluation; kept for the echo.
    values: Box<[Val]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Equal,
    NotEqual,
    Less,
    LessEqual,
    Greater,
    GreaterEqual,
    IsNull,
    IsNotNull,
}

impl Op {
    fn of(method: &str) -> Op {
        match method {
            "equal" => Op::Equal,
            "notEqual" => Op::NotEqual,
            "lessThan" => Op::Less,
            "lessThanEqual" => Op::LessEqual,
            "greaterThan" => Op::Greater,
            "greaterThanEqual" => Op::GreaterEqual,
            "isNull" => Op::IsNull,
            "isNotNull" => Op::IsNotNull,
            other => unreachable!("the realtime checks passed {other}"),
        }
    }

    fn method(self) -> &'static str {
        match self {
            Op::Equal => "equal",
            Op::NotEqual => "notEqual",
            Op::Less => "lessThan",
            Op::LessEqual => "lessThanEqual",
            Op::Greater => "greaterThan",
            Op::GreaterEqual => "greaterThanEqual",
            Op::IsNull => "isNull",
            Op::IsNotNull => "isNotNull",
        }
    }
}

/// An attribute and, if it has dots, where they are (split once, at compile time).
#[derive(Debug, Clone, PartialEq)]
struct Path {
    attribute: Box<str>,
    dots: Box<[u32]>,
}

impl Path {
    fn new(attribute: String) -> Path {
        let dots = attribute
            .bytes()
            .enumerate()
            .filter(|&(_, b)| b == b'.')
            .map(|(i, _)| i as u32)
            .collect();
        Path {
            attribute: attribute.into_boxed_str(),
            dots,
        }
    }

    /// The attribute's value in the payload: a top-level key of that exact name, else the
    /// nested objects its dotted segments name.
    fn lookup<'a>(&self, payload: &'a Value) -> Option<&'a Value> {
        let top = payload.as_object()?;
        if let Some(v) = top.get(&*self.attribute) {
            return Some(v);
        }
        if self.dots.is_empty() {
            return None;
        }
        let mut object = top;
        let mut start = 0;
        for &dot in self.dots.iter() {
            let dot = dot as usize;
            object = object.get(&self.attribute[start..dot])?.as_object()?;
            start = dot + 1;
        }
        object.get(&self.attribute[start..])
    }
}

/// A query value, converted once.
#[derive(Debug, Clone, PartialEq)]
enum Val {
    Null,
    Bool(bool),
    Num(Num),
    Str(Box<str>),
    /// Arrays and objects: only ever equal to an identical array or object.
    Json(Box<Value>),
}

impl Val {
    fn of(v: Value) -> Val {
        match v {
            Value::Null => Val::Null,
            Value::Bool(b) => Val::Bool(b),
            Value::Number(n) => Val::Num(Num::of(&n)),
            Value::String(s) => Val::Str(s.into_boxed_str()),
            other => Val::Json(Box::new(other)),
        }
    }

    /// Strict equality (PHP's `===`), numbers by value.
    fn equals(&self, v: &Value) -> bool {
        match (self, v) {
            (Val::Null, Value::Null) => true,
            (Val::Bool(a), Value::Bool(b)) => a == b,
            (Val::Num(a), Value::Number(b)) => a.cmp(Num::of(b)) == Some(Ordering::Equal),
            (Val::Str(a), Value::String(b)) => **a == **b,
            (Val::Json(a), b) => json_eq(a, b),
            _ => false,
        }
    }
}

/// Deep strict equality, numbers by value, object members in any order.
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => Num::of(x).cmp(Num::of(y)) == Some(Ordering::Equal),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_eq(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

/// A JSON number, kept exact when it is an integer.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Num {
    I(i64),
    U(u64),
    F(f64),
}

impl Num {
    fn of(n: &Number) -> Num {
        if let Some(i) = n.as_i64() {
            Num::I(i)
        } else if let Some(u) = n.as_u64() {
            Num::U(u)
        } else {
            Num::F(n.as_f64().unwrap_or(f64::NAN))
        }
    }

    fn int(self) -> Option<i128> {
        match self {
            Num::I(i) => Some(i128::from(i)),
            Num::U(u) => Some(i128::from(u)),
            Num::F(_) => None,
        }
    }

    fn float(self) -> f64 {
        match self {
            Num::I(i) => i as f64,
            Num::U(u) => u as f64,
            Num::F(f) => f,
        }
    }

    /// Exact between integers, otherwise as `f64`.
    fn cmp(self, other: Num) -> Option<Ordering> {
        match (self.int(), other.int()) {
            (Some(a), Some(b)) => Some(a.cmp(&b)),
            _ => self.float().partial_cmp(&other.float()),
        }
    }
}

/// A PHP numeric string's number: optional surrounding whitespace, a sign, decimal digits with
/// an optional fraction and exponent. Integers that do not fit i64 become floats, as in PHP.
fn php_numeric(s: &str) -> Option<Num> {
    let t = s.trim_matches(|c| matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c'));
    let b = t.as_bytes();
    let mut i = 0;
    if matches!(b.first(), Some(b'+' | b'-')) {
        i += 1;
    }
    let int_start = i;
    while b.get(i).is_some_and(u8::is_ascii_digit) {
        i += 1;
    }
    let mut digits = i - int_start;
    let mut integer = true;
    if b.get(i) == Some(&b'.') {
        integer = false;
        i += 1;
        let frac_start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        digits += i - frac_start;
    }
    if digits == 0 {
        return None;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        integer = false;
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let exp_start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == exp_start {
            return None;
        }
    }
    if i != b.len() {
        return None;
    }
    if integer && let Ok(n) = t.parse::<i64>() {
        return Some(Num::I(n));
    }
    t.parse::<f64>().ok().map(Num::F)
}

/// PHP 8's `payload <=> value`, where it means something (see the module header).
fn compare(v: &Value, q: &Val) -> Option<Ordering> {
    match (v, q) {
        (Value::Number(a), Val::Num(b)) => Num::of(a).cmp(*b),
        (Value::String(a), Val::Str(b)) => match (php_numeric(a), php_numeric(b)) {
            (Some(x), Some(y)) => x.cmp(y),
            _ => Some(a.as_bytes().cmp(b.as_bytes())),
        },
        (Value::Number(a), Val::Str(b)) => php_numeric(b).and_then(|y| Num::of(a).cmp(y)),
        (Value::String(a), Val::Num(b)) => php_numeric(a).and_then(|x| x.cmp(*b)),
        (Value::Bool(a), Val::Bool(b)) => Some(a.cmp(b)),
        _ => None,
    }
}

impl Node {
    fn compile(raw: Raw) -> Node {
        let attribute = raw.attribute;
        match raw.method.as_str() {
            "and" | "or" => {
                let group = Group {
                    attribute: attribute.into_boxed_str(),
                    children: raw.children.into_iter().map(Node::compile).collect(),
                };
                if raw.method == "and" {
                    Node::And(group)
                } else {
                    Node::Or(group)
                }
            }
            "select" => Node::Select(attribute.into_boxed_str()),
            method => Node::Leaf(Leaf {
                op: Op::of(method),
                path: Path::new(attribute),
                values: raw.values.into_iter().map(Val::of).collect(),
            }),
        }
    }

    fn eval(&self, payload: &Value) -> bool {
        match self {
            Node::Leaf(leaf) => leaf.eval(payload),
            Node::And(g) => g.children.iter().all(|n| n.eval(payload)),
            Node::Or(g) => g.children.iter().any(|n| n.eval(payload)),
            Node::Select(_) => false,
        }
    }

    /// Appwrite's `Query::toString`: `{"method":…,"attribute":…,"values":[…]}`, the attribute
    /// left out when PHP deems it empty, the values of an empty and/or left out.
    fn write(&self, out: &mut String) {
        let (method, attribute) = match self {
            Node::Leaf(l) => (l.op.method(), &*l.path.attribute),
            Node::And(g) => ("and", &*g.attribute),
            Node::Or(g) => ("or", &*g.attribute),
            Node::Select(a) => ("select", &**a),
        };
        out.push_str("{\"method\":");
        php_string(out, method);
        // PHP's empty(): "" and "0" are both empty.
        if !attribute.is_empty() && attribute != "0" {
            out.push_str(",\"attribute\":");
            php_string(out, attribute);
        }
        match self {
            Node::Leaf(l) => {
                out.push_str(",\"values\":[");
                for (i, v) in l.values.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    php_val(out, v);
                }
                out.push(']');
            }
            Node::And(g) | Node::Or(g) if !g.children.is_empty() => {
                out.push_str(",\"values\":[");
                for (i, c) in g.children.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    c.write(out);
                }
                out.push(']');
            }
            Node::And(_) | Node::Or(_) => {}
            Node::Select(_) => out.push_str(",\"values\":[\"*\"]"),
        }
        out.push('}');
    }
}

impl Leaf {
    fn eval(&self, payload: &Value) -> bool {
        let Some(v) = self.path.lookup(payload) else {
            return false;
        };
        let any = |want: fn(Ordering) -> bool| {
            self.values.iter().any(|q| compare(v, q).is_some_and(want))
        };
        match self.op {
            Op::Equal => self.values.iter().any(|q| q.equals(v)),
            Op::NotEqual => !self.values.iter().any(|q| q.equals(v)),
            Op::Less => any(Ordering::is_lt),
            Op::LessEqual => any(Ordering::is_le),
            Op::Greater => any(Ordering::is_gt),
            Op::GreaterEqual => any(Ordering::is_ge),
            Op::IsNull => v.is_null(),
            Op::IsNotNull => !v.is_null(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// PHP's json_encode (default flags), for the echo

fn php_val(out: &mut String, v: &Val) {
    match v {
        Val::Null => out.push_str("null"),
        Val::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Val::Num(n) => php_number(out, *n),
        Val::Str(s) => php_string(out, s),
        Val::Json(j) => php_json(out, j),
    }
}

fn php_json(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => php_number(out, Num::of(n)),
        Value::String(s) => php_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                php_json(out, item);
            }
            out.push(']');
        }
        // PHP decodes `{}` to an empty array, which it encodes as `[]`.
        Value::Object(members) if members.is_empty() => out.push_str("[]"),
        Value::Object(members) => {
            out.push('{');
            for (i, (k, item)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                php_string(out, k);
                out.push(':');
                php_json(out, item);
            }
            out.push('}');
        }
    }
}

fn php_number(out: &mut String, n: Num) {
    match n {
        Num::I(i) => {
            let _ = write!(out, "{i}");
        }
        // Beyond i64, PHP holds (and prints) the integer as a float.
        Num::U(u) => php_float(out, u as f64),
        Num::F(f) => php_float(out, f),
    }
}

/// A float as PHP's `json_encode` prints it (`serialize_precision` -1): the shortest digits that
/// read back the same, no `.0` on whole numbers, exponent form (`1.0e+25`, `1.0e-5`) when the
/// decimal point would sit more than 17 digits right or 4 zeros left of the digits.
fn php_float(out: &mut String, f: f64) {
    if f.is_sign_negative() {
        out.push('-');
    }
    let f = f.abs();
    if f == 0.0 {
        out.push('0');
        return;
    }
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let exp: i32 = exp.parse().unwrap_or(0);
    // The value is 0.DIGITS × 10^point.
    let point = exp + 1;
    if !(-3..=17).contains(&point) {
        out.push_str(&digits[..1]);
        out.push('.');
        out.push_str(if digits.len() > 1 { &digits[1..] } else { "0" });
        let _ = write!(out, "e{}{}", if exp < 0 { '-' } else { '+' }, exp.abs());
    } else if point <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', point.unsigned_abs() as usize));
        out.push_str(&digits);
    } else {
        let point = point as usize;
        if digits.len() <= point {
            out.push_str(&digits);
            out.extend(std::iter::repeat_n('0', point - digits.len()));
        } else {
            out.push_str(&digits[..point]);
            out.push('.');
            out.push_str(&digits[point..]);
        }
    }
}

/// A string as PHP's `json_encode` escapes it: `/` too, and everything outside ASCII as
/// `\uXXXX` (lower-case hex, surrogate pairs beyond the BMP).
fn php_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '/' => out.push_str("\\/"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c < ' ' || !c.is_ascii() => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn limits() -> FilterLimits {
        FilterLimits::default()
    }

    fn filter(queries: &[&str]) -> Filter {
        Filter::compile(queries, &limits())
            .unwrap_or_else(|e| panic!("{queries:?} should compile: {e}"))
    }

    fn error(queries: &[&str]) -> String {
        match Filter::compile(queries, &limits()) {
            Ok(_) => panic!("{queries:?} should not compile"),
            Err(e) => e.to_string(),
        }
    }

    /// One query built from its parts, as the SDKs encode them.
    fn q(method: &str, attribute: &str, values: Value) -> String {
        json!({"method": method, "attribute": attribute, "values": values}).to_string()
    }

    fn one(method: &str, attribute: &str, values: Value) -> Filter {
        filter(&[&q(method, attribute, values)])
    }

    #[test]
    fn no_queries_select_everything() {
        let f = filter(&[]);
        assert!(f.is_select_all());
        assert!(f.matches(&json!({})));
        assert!(f.matches(&json!({"a": 1})));
        assert!(f.matches(&json!(null)));
        assert!(f.canonical().is_empty());
        assert_eq!(Filter::default(), f);
    }

    #[test]
    fn select_star_selects_everything_and_wins_over_other_queries() {
        let star = r#"{"method":"select","values":["*"]}"#;
        let f = filter(&[star]);
        assert!(f.is_select_all());
        assert!(f.matches(&json!({})));
        assert_eq!(f.canonical(), [star]);

        let eq = q("equal", "status", json!(["a"]));
        for queries in [[star, eq.as_str()], [eq.as_str(), star]] {
            let f = filter(&queries);
            assert!(f.is_select_all());
            assert!(f.matches(&json!({"status": "b"})));
            assert_eq!(f.canonical().len(), 2);
        }

        let f = one("equal", "status", json!(["a"]));
        assert!(!f.is_select_all());
    }

    #[test]
    fn select_other_than_star_is_refused() {
        let text = "Only select(\"*\") is allowed in Realtime queries. select(\"*\") means \"listen to all events\".";
        for values in [
            json!(["name"]),
            json!([]),
            json!(["*", "name"]),
            json!([1]),
            json!([["*"]]),
        ] {
            let query = json!({"method": "select", "values": values}).to_string();
            assert_eq!(error(&[&query]), text, "{query}");
        }
        assert_eq!(error(&[r#"{"method":"select"}"#]), text);
        let nested = r#"{"method":"and","values":[{"method":"select","values":["a"]}]}"#;
        assert_eq!(error(&[nested]), text);
    }

    #[test]
    fn nested_select_star_matches_nothing() {
        let f = filter(&[
            r#"{"method":"or","values":[{"method":"select","values":["*"]},{"method":"equal","attribute":"a","values":[1]}]}"#,
        ]);
        assert!(!f.is_select_all());
        assert!(f.matches(&json!({"a": 1})));
        assert!(!f.matches(&json!({"a": 2})));
        let f = filter(&[r#"{"method":"and","values":[{"method":"select","values":["*"]}]}"#]);
        assert!(!f.matches(&json!({"a": 1})));
    }

    #[test]
    fn equal_matches_any_value() {
        let f = one("equal", "status", json!(["active", "pending"]));
        assert!(f.matches(&json!({"status": "active"})));
        assert!(f.matches(&json!({"status": "pending"})));
        assert!(!f.matches(&json!({"status": "rejected"})));
        assert!(!f.matches(&json!({"other": "active"})));
        assert!(!one("equal", "status", json!([])).matches(&json!({"status": "a"})));

        assert!(one("equal", "n", json!([0])).matches(&json!({"n": 0})));
        assert!(one("equal", "s", json!([""])).matches(&json!({"s": ""})));
        assert!(one("equal", "b", json!([false])).matches(&json!({"b": false})));
        assert!(one("equal", "x", json!([null])).matches(&json!({"x": null})));
        assert!(!one("equal", "x", json!([null])).matches(&json!({"x": 0})));
        assert!(one("equal", "f", json!([8.5])).matches(&json!({"f": 8.5})));
    }

    #[test]
    fn not_equal_matches_none_of_the_values_on_a_present_attribute() {
        let f = one("notEqual", "status", json!(["rejected", "cancelled"]));
        assert!(f.matches(&json!({"status": "active"})));
        assert!(!f.matches(&json!({"status": "rejected"})));
        assert!(!f.matches(&json!({"status": "cancelled"})));
        assert!(f.matches(&json!({"status": null})));
        assert!(f.matches(&json!({"status": 1})));
        assert!(
            !f.matches(&json!({})),
            "a missing attribute matches nothing"
        );
    }

    #[test]
    fn ordering_methods_on_numbers() {
        let payload = |n: Value| json!({ "age": n });
        let lt = one("lessThan", "age", json!([30]));
        let le = one("lessThanEqual", "age", json!([30]));
        let gt = one("greaterThan", "age", json!([30]));
        let ge = one("greaterThanEqual", "age", json!([30]));
        for (age, l, le_, g, ge_) in [
            (json!(25), true, true, false, false),
            (json!(30), false, true, false, true),
            (json!(35), false, false, true, true),
            (json!(29.5), true, true, false, false),
            (json!(30.0), false, true, false, true),
            (json!(-1), true, true, false, false),
        ] {
            assert_eq!(lt.matches(&payload(age.clone())), l, "lt {age}");
            assert_eq!(le.matches(&payload(age.clone())), le_, "le {age}");
            assert_eq!(gt.matches(&payload(age.clone())), g, "gt {age}");
            assert_eq!(ge.matches(&payload(age.clone())), ge_, "ge {age}");
        }
        assert!(one("greaterThan", "s", json!([8.5])).matches(&json!({"s": 9.2})));
        // Several values: any comparison that holds.
        assert!(one("lessThan", "a", json!([1, 100])).matches(&json!({"a": 50})));
        for f in [&lt, &le, &gt, &ge] {
            assert!(!f.matches(&json!({})), "missing");
            assert!(!f.matches(&payload(json!(null))), "null");
            assert!(!f.matches(&payload(json!([1]))), "array");
            assert!(!f.matches(&payload(json!({"x": 1}))), "object");
            assert!(!f.matches(&payload(json!(true))), "bool");
        }
    }

    #[test]
    fn ordering_methods_on_strings() {
        let lt = one("lessThan", "name", json!(["M"]));
        assert!(lt.matches(&json!({"name": "A"})));
        assert!(!lt.matches(&json!({"name": "Z"})));
        assert!(!lt.matches(&json!({"name": "M"})));
        assert!(lt.matches(&json!({"name": ""})));
        let after = one(
            "greaterThan",
            "$createdAt",
            json!(["2026-01-01T00:00:00.000+00:00"]),
        );
        assert!(after.matches(&json!({"$createdAt": "2026-08-21T12:00:00.123+00:00"})));
        assert!(!after.matches(&json!({"$createdAt": "2025-12-31T23:59:59.999+00:00"})));
        // Two numeric strings compare as numbers (PHP 8; Appwrite's tests rely on it).
        assert!(one("lessThan", "v", json!(["10"])).matches(&json!({"v": "9"})));
        assert!(one("lessThan", "v", json!(["1e3"])).matches(&json!({"v": " 999.5"})));
        // Otherwise byte-wise: "9a" is not numeric.
        assert!(!one("lessThan", "v", json!(["10"])).matches(&json!({"v": "9a"})));
    }

    #[test]
    fn numeric_strings_as_php_reads_them() {
        for (s, n) in [
            ("0", Num::I(0)),
            ("-12", Num::I(-12)),
            ("+7", Num::I(7)),
            (" 42\n", Num::I(42)),
            ("1.5", Num::F(1.5)),
            (".5", Num::F(0.5)),
            ("5.", Num::F(5.0)),
            ("1e3", Num::F(1000.0)),
            ("-2.5E-1", Num::F(-0.25)),
            ("9223372036854775808", Num::F(9223372036854775808.0)),
        ] {
            assert_eq!(php_numeric(s), Some(n), "{s:?}");
        }
        for s in [
            "", " ", "abc", "1a", "0x1A", "1e", "e5", ".", "-", "inf", "NaN", "1 2", "١",
        ] {
            assert_eq!(php_numeric(s), None, "{s:?}");
        }
    }

    #[test]
    fn numbers_and_strings_never_equal_but_order_numerically_when_numeric() {
        assert!(!one("equal", "n", json!(["1"])).matches(&json!({"n": 1})));
        assert!(!one("equal", "n", json!([1])).matches(&json!({"n": "1"})));
        assert!(one("notEqual", "n", json!(["1"])).matches(&json!({"n": 1})));
        assert!(one("greaterThan", "n", json!(["30"])).matches(&json!({"n": 31})));
        assert!(one("lessThan", "n", json!([30])).matches(&json!({"n": "29"})));
        // A number against a non-numeric string: no match either way.
        assert!(!one("lessThan", "n", json!(["abc"])).matches(&json!({"n": 1})));
        assert!(!one("greaterThan", "n", json!(["abc"])).matches(&json!({"n": 1})));
        assert!(!one("lessThan", "n", json!([1])).matches(&json!({"n": "abc"})));
    }

    #[test]
    fn booleans_equal_only_booleans() {
        let t = one("equal", "active", json!([true]));
        assert!(t.matches(&json!({"active": true})));
        assert!(!t.matches(&json!({"active": false})));
        assert!(!t.matches(&json!({"active": 1})));
        assert!(!t.matches(&json!({"active": "true"})));
        assert!(!one("equal", "n", json!([1])).matches(&json!({"n": true})));
        assert!(!one("equal", "n", json!([0])).matches(&json!({"n": false})));
        assert!(!one("equal", "n", json!([null])).matches(&json!({"n": false})));
        assert!(one("greaterThan", "b", json!([false])).matches(&json!({"b": true})));
        assert!(!one("greaterThan", "b", json!([true])).matches(&json!({"b": true})));
        assert!(!one("greaterThan", "b", json!([0])).matches(&json!({"b": true})));
    }

    #[test]
    fn big_integers_compare_exactly() {
        let big = json!({"id": 9007199254740993_u64});
        assert!(!one("equal", "id", json!([9007199254740992_u64])).matches(&big));
        assert!(one("equal", "id", json!([9007199254740993_u64])).matches(&big));
        assert!(one("greaterThan", "id", json!([9007199254740992_u64])).matches(&big));
        assert!(!one("lessThanEqual", "id", json!([9007199254740992_u64])).matches(&big));
        let max = json!({"id": u64::MAX});
        assert!(one("greaterThan", "id", json!([i64::MAX])).matches(&max));
        assert!(one("equal", "id", json!([u64::MAX])).matches(&max));
        assert!(!one("equal", "id", json!([u64::MAX - 1])).matches(&max));
        assert!(one("lessThan", "id", json!([i64::MIN + 1])).matches(&json!({"id": i64::MIN})));
        // Parsed from the query string, not built: serde_json keeps the integer exact.
        let f = filter(&[r#"{"method":"equal","attribute":"id","values":[9007199254740993]}"#]);
        assert!(f.matches(&big));
        assert!(!f.matches(&json!({"id": 9007199254740992_u64})));
    }

    #[test]
    fn integers_and_floats_compare_by_value() {
        assert!(one("equal", "n", json!([1])).matches(&json!({"n": 1.0})));
        assert!(one("equal", "n", json!([1.0])).matches(&json!({"n": 1})));
        assert!(!one("equal", "n", json!([1.5])).matches(&json!({"n": 1})));
        assert!(one("lessThan", "n", json!([1.5])).matches(&json!({"n": 1})));
    }

    #[test]
    fn null_and_missing_attributes() {
        let is_null = one("isNull", "d", json!([]));
        assert!(is_null.matches(&json!({"d": null})));
        assert!(!is_null.matches(&json!({"d": "text"})));
        assert!(!is_null.matches(&json!({"d": 0})));
        assert!(
            !is_null.matches(&json!({})),
            "missing is not null (Appwrite)"
        );
        let not_null = one("isNotNull", "d", json!([]));
        assert!(not_null.matches(&json!({"d": "text"})));
        assert!(not_null.matches(&json!({"d": false})));
        assert!(not_null.matches(&json!({"d": []})));
        assert!(!not_null.matches(&json!({"d": null})));
        assert!(!not_null.matches(&json!({})));
        assert!(!one("equal", "d", json!(["x"])).matches(&json!({})));
        // A payload that is not an object has no attributes.
        assert!(!one("isNotNull", "d", json!([])).matches(&json!([1])));
        assert!(!one("isNull", "d", json!([])).matches(&json!(null)));
        // isNull needs no values, and compiles without any.
        assert!(filter(&[r#"{"method":"isNull","attribute":"d"}"#]).matches(&json!({"d": null})));
    }

    #[test]
    fn array_attributes_equal_only_identical_arrays() {
        let tags = json!({"tags": ["a", "b"]});
        assert!(!one("equal", "tags", json!(["a"])).matches(&tags));
        assert!(!one("equal", "tags", json!([["a"]])).matches(&tags));
        assert!(!one("equal", "tags", json!([["b", "a"]])).matches(&tags));
        assert!(one("equal", "tags", json!([["a", "b"]])).matches(&tags));
        assert!(one("notEqual", "tags", json!(["a"])).matches(&tags));
        assert!(
            one("equal", "o", json!([{"x": 1, "y": [2]}]))
                .matches(&json!({"o": {"y": [2.0], "x": 1}}))
        );
        assert!(!one("equal", "o", json!([{"x": 1}])).matches(&json!({"o": {"x": 1, "y": 2}})));
    }

    #[test]
    fn and_or_nest() {
        let f = filter(&[&json!({"method": "and", "values": [
            {"method": "equal", "attribute": "type", "values": ["user"]},
            {"method": "or", "values": [
                {"method": "equal", "attribute": "status", "values": ["active"]},
                {"method": "and", "values": [
                    {"method": "greaterThan", "attribute": "age", "values": [18]},
                    {"method": "isNotNull", "attribute": "email", "values": []}
                ]}
            ]}
        ]})
        .to_string()]);
        assert!(f.matches(&json!({"type": "user", "status": "active"})));
        assert!(f.matches(&json!({"type": "user", "status": "x", "age": 20, "email": "e"})));
        assert!(!f.matches(&json!({"type": "user", "status": "x", "age": 20, "email": null})));
        assert!(!f.matches(&json!({"type": "user", "status": "x", "age": 18, "email": "e"})));
        assert!(!f.matches(&json!({"type": "admin", "status": "active"})));
        assert!(!f.is_select_all());

        assert!(filter(&[r#"{"method":"and","values":[]}"#]).matches(&json!({})));
        assert!(!filter(&[r#"{"method":"or","values":[]}"#]).matches(&json!({"a": 1})));
        assert!(!filter(&[r#"{"method":"or"}"#]).matches(&json!({"a": 1})));
    }

    #[test]
    fn queries_and_together() {
        let a = q("equal", "name", json!(["John"]));
        let b = q("equal", "age", json!([30]));
        let f = filter(&[&a, &b]);
        assert!(f.matches(&json!({"name": "John", "age": 30})));
        assert!(!f.matches(&json!({"name": "John", "age": 25})));
        assert!(!f.matches(&json!({"name": "Jane", "age": 30})));
    }

    #[test]
    fn nested_queries_may_be_strings() {
        let inner = q("equal", "a", json!([1]));
        let f = filter(&[&json!({"method": "or", "values": [inner, {"method": "equal", "attribute": "b", "values": [2]}]}).to_string()]);
        assert!(f.matches(&json!({"a": 1})));
        assert!(f.matches(&json!({"b": 2})));
        assert!(!f.matches(&json!({"a": 2})));
        // Echoed as objects, as Appwrite re-encodes the parsed tree.
        assert_eq!(
            f.canonical(),
            [
                r#"{"method":"or","values":[{"method":"equal","attribute":"a","values":[1]},{"method":"equal","attribute":"b","values":[2]}]}"#
            ]
        );
    }

    #[test]
    fn dotted_attributes_reach_into_nested_objects() {
        let f = one("equal", "author.address.city", json!(["Oslo"]));
        assert!(f.matches(&json!({"author": {"address": {"city": "Oslo"}}})));
        assert!(!f.matches(&json!({"author": {"address": {"city": "Rome"}}})));
        assert!(!f.matches(&json!({"author": {"address": "Oslo"}})));
        assert!(!f.matches(&json!({"author": [{"address": {"city": "Oslo"}}]})));
        assert!(!f.matches(&json!({"author": null})));
        assert!(!f.matches(&json!({})));
        // A top-level key of that exact name comes first (it is all Appwrite looks up).
        assert!(f.matches(
            &json!({"author.address.city": "Oslo", "author": {"address": {"city": "Rome"}}})
        ));
        assert!(!f.matches(
            &json!({"author.address.city": "Rome", "author": {"address": {"city": "Oslo"}}})
        ));

        let is_null = one("isNull", "a.b", json!([]));
        assert!(is_null.matches(&json!({"a": {"b": null}})));
        assert!(!is_null.matches(&json!({"a": {}})));
        assert!(!is_null.matches(&json!({"a": null})));
        assert!(one("greaterThan", "a.b", json!([1])).matches(&json!({"a": {"b": 2}})));
        // Empty segments are keys like any other.
        assert!(one("equal", "a.", json!([1])).matches(&json!({"a": {"": 1}})));
        assert!(one("equal", "", json!([1])).matches(&json!({"": 1})));
        assert!(one("equal", "$id", json!(["x"])).matches(&json!({"$id": "x"})));
    }

    #[test]
    fn malformed_queries_get_the_query_parsers_errors() {
        assert_eq!(error(&["not json"]), "Invalid query: Syntax error");
        assert_eq!(error(&[""]), "Invalid query: Syntax error");
        assert_eq!(
            error(&[r#"{"method":"equal""#]),
            "Invalid query: Syntax error"
        );
        assert_eq!(
            error(&["{\"method\":\"equal\",\"attribute\":\"a\u{1}\"}"]),
            "Invalid query: Control character error, possibly incorrectly encoded"
        );
        assert_eq!(
            error(&["5"]),
            "Invalid query. Must be an array, got integer"
        );
        assert_eq!(
            error(&["1.5"]),
            "Invalid query. Must be an array, got double"
        );
        assert_eq!(
            error(&["\"equal\""]),
            "Invalid query. Must be an array, got string"
        );
        assert_eq!(
            error(&["true"]),
            "Invalid query. Must be an array, got boolean"
        );
        assert_eq!(
            error(&["null"]),
            "Invalid query. Must be an array, got NULL"
        );
        assert_eq!(error(&["[]"]), "Invalid query method: ");
        assert_eq!(error(&["{}"]), "Invalid query method: ");
        assert_eq!(
            error(&[r#"{"method":5}"#]),
            "Invalid query method. Must be a string, got integer"
        );
        assert_eq!(
            error(&[r#"{"method":["equal"]}"#]),
            "Invalid query method. Must be a string, got array"
        );
        assert_eq!(
            error(&[r#"{"method":"equal","attribute":1}"#]),
            "Invalid query attribute. Must be a string, got integer"
        );
        assert_eq!(
            error(&[r#"{"method":"equal","attribute":"a","values":"x"}"#]),
            "Invalid query values. Must be an array, got string"
        );
        assert_eq!(
            error(&[r#"{"method":"or","values":[5]}"#]),
            "Invalid nested query. Must be an array or string, got integer"
        );
        assert_eq!(
            error(&[r#"{"method":"or","values":["nope"]}"#]),
            "Invalid query: Syntax error"
        );
        // Absent and null fields read as empty.
        let f = filter(&[r#"{"method":"equal","attribute":null,"values":null}"#]);
        assert!(!f.matches(&json!({"": 1})));
    }

    #[test]
    fn unknown_methods() {
        assert_eq!(error(&[r#"{"method":"foo"}"#]), "Invalid query method: foo");
        assert_eq!(
            error(&[r#"{"method":"Equal"}"#]),
            "Invalid query method: Equal"
        );
        let not_realtime = |m: &str| {
            format!(
                "Query method '{m}' is not supported in Realtime queries. Allowed query methods are: equal, notEqual, lessThan, lessThanEqual, greaterThan, greaterThanEqual, isNull, isNotNull, and, or, select"
            )
        };
        for m in [
            "contains",
            "search",
            "between",
            "startsWith",
            "limit",
            "orderAsc",
            "elemMatch",
            "exists",
        ] {
            assert_eq!(error(&[&q(m, "a", json!([]))]), not_realtime(m));
        }
        let nested = json!({"method": "and", "values": [
            {"method": "equal", "attribute": "status", "values": ["active"]},
            {"method": "or", "values": [
                {"method": "greaterThan", "attribute": "score", "values": [50]},
                {"method": "startsWith", "attribute": "name", "values": ["t"]}
            ]}
        ]});
        assert_eq!(error(&[&nested.to_string()]), not_realtime("startsWith"));
        // Appwrite walks the last query first.
        let contains = q("contains", "a", json!(["x"]));
        let search = q("search", "a", json!(["x"]));
        assert_eq!(error(&[&contains, &search]), not_realtime("search"));
        // Every query is parsed before any is checked for realtime.
        assert_eq!(error(&[&contains, "{"]), "Invalid query: Syntax error");
    }

    #[test]
    fn every_limit_is_enforced_and_named() {
        let l = limits();
        let eq = q("equal", "a", json!([1]));

        let many = vec![eq.as_str(); l.max_queries];
        assert!(Filter::compile(&many, &l).is_ok());
        let too_many = vec![eq.as_str(); l.max_queries + 1];
        assert_eq!(
            Filter::compile(&too_many, &l).unwrap_err(),
            FilterError::TooManyQueries(100)
        );
        assert_eq!(
            FilterError::TooManyQueries(100).to_string(),
            "Too many queries: a subscription may carry at most 100 queries"
        );

        let mut nested = json!({"method": "equal", "attribute": "a", "values": [1]});
        for _ in 0..l.max_depth {
            nested = json!({"method": "and", "values": [nested]});
        }
        let f = filter(&[&nested.to_string()]);
        assert!(f.matches(&json!({"a": 1})));
        let deeper = json!({"method": "or", "values": [nested]}).to_string();
        assert_eq!(
            error(&[&deeper]),
            "Query is nested too deeply: and/or may nest at most 5 levels"
        );

        let values: Vec<u32> = (0..100).collect();
        assert!(one("equal", "a", json!(values)).matches(&json!({"a": 99})));
        let values: Vec<u32> = (0..101).collect();
        assert_eq!(
            error(&[&q("equal", "a", json!(values))]),
            "Too many values: a query may carry at most 100 values"
        );
        let children = vec![json!({"method": "isNull", "attribute": "a"}); 101];
        assert_eq!(
            error(&[&json!({"method": "or", "values": children}).to_string()]),
            "Too many values: a query may carry at most 100 values"
        );

        assert!(Filter::compile(&[q("equal", &"a".repeat(256), json!([1]))], &l).is_ok());
        assert_eq!(
            error(&[&q("equal", &"a".repeat(257), json!([1]))]),
            "Attribute is too long: an attribute name may be at most 256 bytes"
        );

        let overhead = q("equal", "a", json!([""])).len();
        let fits = q("equal", "a", json!(["x".repeat(4096 - overhead)]));
        assert_eq!(fits.len(), 4096);
        assert!(Filter::compile(&[fits], &l).is_ok());
        let long = q("equal", "a", json!(["x".repeat(4097 - overhead)]));
        assert_eq!(
            error(&[&long]),
            "Query is too long: a query may be at most 4096 bytes"
        );

        // JSON nested past serde_json's own limit counts as too deep, not as a syntax error.
        let deep_json = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let deep = format!(r#"{{"method":"equal","attribute":"a","values":{deep_json}}}"#);
        assert_eq!(error(&[&deep]), FilterError::TooDeep(5).to_string());

        let tight = FilterLimits {
            max_queries: 1,
            max_depth: 0,
            max_values: 1,
            max_attribute_bytes: 1,
            max_query_bytes: 60,
        };
        assert_eq!(
            Filter::compile(&[r#"{"method":"and","values":[]}"#], &tight).unwrap_err(),
            FilterError::TooDeep(0)
        );
        assert_eq!(
            Filter::compile(&[q("equal", "ab", json!([1]))], &tight).unwrap_err(),
            FilterError::AttributeTooLong(1)
        );
        assert!(Filter::compile(&[q("equal", "a", json!([1]))], &tight).is_ok());
    }

    #[test]
    fn decoded_queries_compile_too() {
        let l = limits();
        let strings = [json!(q("equal", "a", json!([1])))];
        let f = Filter::compile_values(&strings, &l).unwrap();
        assert!(f.matches(&json!({"a": 1})));
        let objects = [json!({"method": "equal", "attribute": "a", "values": [1]})];
        assert_eq!(Filter::compile_values(&objects, &l).unwrap(), f);
        assert_eq!(
            Filter::compile_values(&[json!(5)], &l)
                .unwrap_err()
                .to_string(),
            "Invalid query. Must be a string, got integer"
        );
        assert_eq!(
            Filter::compile_values(&[json!(["x"])], &l).unwrap_err(),
            FilterError::NotAString("array")
        );
        let big = [json!({"method": "equal", "attribute": "a", "values": ["x".repeat(5000)]})];
        assert_eq!(
            Filter::compile_values(&big, &l).unwrap_err(),
            FilterError::QueryTooLong(4096)
        );
        assert!(Filter::compile_values(&[], &l).unwrap().is_select_all());
    }

    #[test]
    fn canonical_strings_are_what_appwrite_echoes() {
        // What the SDKs send comes back unchanged.
        for s in [
            r#"{"method":"equal","attribute":"status","values":["a"]}"#,
            r#"{"method":"equal","attribute":"$id","values":["6f1c0e2a0012ab34cd56"]}"#,
            r#"{"method":"notEqual","attribute":"n","values":[1,-2,3.5,true,null]}"#,
            r#"{"method":"isNull","attribute":"d","values":[]}"#,
            r#"{"method":"select","values":["*"]}"#,
            r#"{"method":"and","values":[{"method":"lessThan","attribute":"a","values":[1]},{"method":"or","values":[{"method":"isNotNull","attribute":"b","values":[]}]}]}"#,
        ] {
            assert_eq!(filter(&[s]).canonical(), [s]);
        }
        let echo = |s: &str| filter(&[s]).canonical().remove(0);
        // Re-encoded the PHP way: field order, slashes, non-ASCII, empty fields.
        assert_eq!(
            echo(r#"{"values":["a/b"],"attribute":"x","method":"equal"}"#),
            r#"{"method":"equal","attribute":"x","values":["a\/b"]}"#
        );
        assert_eq!(
            echo(r#"{"method":"equal","attribute":"ville","values":["Zürich 😀","\u0001\t"]}"#),
            r#"{"method":"equal","attribute":"ville","values":["Z\u00fcrich \ud83d\ude00","\u0001\t"]}"#
        );
        assert_eq!(
            echo(r#"{"method":"isNull","attribute":"d"}"#),
            r#"{"method":"isNull","attribute":"d","values":[]}"#
        );
        assert_eq!(
            echo(r#"{"method":"equal","attribute":"0","values":[1]}"#),
            r#"{"method":"equal","values":[1]}"#
        );
        assert_eq!(
            echo(r#"{"method":"and","values":[]}"#),
            r#"{"method":"and"}"#
        );
        assert_eq!(
            echo(r#"{"method":"or","attribute":"x"}"#),
            r#"{"method":"or","attribute":"x"}"#
        );
        assert_eq!(
            echo(r#"{"method":"select","attribute":"a","values":["*"]}"#),
            r#"{"method":"select","attribute":"a","values":["*"]}"#
        );
        assert_eq!(
            echo(r#"{"method":"equal","attribute":"a","values":[[1,{"k":"v"}],{}]}"#),
            r#"{"method":"equal","attribute":"a","values":[[1,{"k":"v"}],[]]}"#
        );
        assert_eq!(
            echo(r#"{"method":"equal","attribute":"a","values":{"x":1,"y":2}}"#),
            r#"{"method":"equal","attribute":"a","values":[1,2]}"#
        );
        // Numbers: integers exact, floats as PHP prints them.
        assert_eq!(
            echo(
                r#"{"method":"equal","attribute":"a","values":[9007199254740993,1.0,1.5,-0.25,1e25,0.0001,0.00001,1e16,1e17,-0.0,18446744073709551615]}"#
            ),
            r#"{"method":"equal","attribute":"a","values":[9007199254740993,1,1.5,-0.25,1.0e+25,0.0001,1.0e-5,10000000000000000,1.0e+17,-0,1.8446744073709552e+19]}"#
        );
        assert_eq!(
            echo(r#"{"method":"lessThan","attribute":"a","values":[123.456e-10]}"#),
            r#"{"method":"lessThan","attribute":"a","values":[1.23456e-8]}"#
        );
    }

    #[test]
    fn php_floats() {
        let show = |f: f64| {
            let mut s = String::new();
            php_float(&mut s, f);
            s
        };
        assert_eq!(show(0.1), "0.1");
        assert_eq!(show(1.0 / 3.0), "0.3333333333333333");
        assert_eq!(show(100.0), "100");
        assert_eq!(show(123456.789), "123456.789");
        assert_eq!(show(1.5e300), "1.5e+300");
        assert_eq!(show(5e-324), "5.0e-324");
        assert_eq!(show(0.001), "0.001");
        assert_eq!(show(12345678901234567890.0), "1.2345678901234567e+19");
    }

    #[test]
    fn a_compiled_filter_is_small() {
        assert!(std::mem::size_of::<Filter>() <= 24);
        assert!(std::mem::size_of::<Val>() <= 24);
        assert!(std::mem::size_of::<Node>() <= 64);
    }
}
