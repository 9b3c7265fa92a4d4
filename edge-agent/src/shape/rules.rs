//! The rules, compiled once per stream and applied in order to each record. Pure: no clock
//! (windowed rules take record and poll times as arguments), no files (keys come in as bytes).
//!
//! Predicates are CEL (the `cel` crate), parsed once per rule. At compile time the rule finds
//! which `record.<field>` names the expression selects; per record only those fields are
//! converted to CEL values (typed field access), not the whole record. An expression that uses
//! `record` some other way (`record["a b"]`, `size(record)`) gets every field. The common
//! shape of a filter — comparisons of `record.<field>` with literals joined by `&&`, `||`
//! and `!` — is also compiled to a native tree ([`Native`]) that reads the typed fields
//! directly; it answers only where its answer is CEL's (same types on both sides, field
//! present) and hands every other record to the CEL program, so results never differ.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use cel::common::ast::{EntryExpr, Expr};
use cel::parser::Expression;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::record::{Fields, Value, hex};

/// What one rule did: the `outcome` label of `backhaul_edge_shape_rule_records_total`.
#[derive(Debug, Default)]
pub struct RuleCounters {
    /// Records the rule let through unchanged.
    pub kept: AtomicU64,
    /// Records the rule dropped (or, for `downsample`, folded into an aggregate).
    pub dropped: AtomicU64,
    /// Records the rule changed and let through.
    pub changed: AtomicU64,
}

impl RuleCounters {
    /// (kept, dropped, changed).
    pub fn load(&self) -> (u64, u64, u64) {
        (self.kept.load(Relaxed), self.dropped.load(Relaxed), self.changed.load(Relaxed))
    }
}

/// One record on its way through the rules.
#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    /// Event time, ms since the epoch.
    pub ts_ms: i64,
    /// MQTT topic.
    pub topic: String,
    /// Decoded fields.
    pub fields: Fields,
    /// Attributes added by `enrich`.
    pub attrs: Vec<(String, String)>,
    /// Names of the rules that matched or changed it so far.
    pub matched: Vec<String>,
}

/// A compiled rule.
#[derive(Debug)]
pub struct Rule {
    /// Its name (config `name`, or `<kind>_<index>`).
    pub name: String,
    /// What it does.
    pub action: Action,
    /// Its counts, shared with `/metrics`.
    pub counters: Arc<RuleCounters>,
}

/// What a rule does.
#[derive(Debug)]
pub enum Action {
    /// Drop records for which the predicate holds.
    Drop(Predicate),
    /// Keep only records for which the predicate holds.
    Keep(Predicate),
    /// Keep 1 in `every`, globally or per key.
    Sample(Sampler),
    /// Replace fields by HMAC-SHA-256 of their text, hex.
    Pseudonymise {
        /// Fields to replace.
        fields: Vec<String>,
        /// The keyed MAC, cloned per value (the key schedule runs once).
        mac: Box<Hmac<Sha256>>,
    },
    /// Replace all but the last `keep_last` characters with `*`.
    Mask {
        /// Fields to mask.
        fields: Vec<String>,
        /// Characters left readable at the end.
        keep_last: usize,
    },
    /// Remove fields.
    Remove(Vec<String>),
    /// Add static attributes and the names of the rules that matched.
    Enrich(Vec<(String, String)>),
    /// Drop a record whose key was seen within the window.
    Dedup(Dedup),
    /// Fold series into per-window aggregates.
    Downsample(Downsampler),
}

/// A rule's decision on one record.
#[derive(Debug)]
pub enum Step {
    /// Go on to the next rule (possibly changed).
    Pass,
    /// The record is gone (dropped, or held in a window).
    Gone,
    /// The rule could not be evaluated: dead-letter the record with this reason.
    Fail(String),
}

impl Rule {
    /// Applies the rule to `item`.
    pub fn apply(&mut self, item: &mut Item) -> Step {
        let (step, changed) = match &mut self.action {
            Action::Drop(p) => match p.eval(item) {
                Ok(true) => (Step::Gone, false),
                Ok(false) => (Step::Pass, false),
                Err(e) => (Step::Fail(e), false),
            },
            Action::Keep(p) => match p.eval(item) {
                Ok(true) => {
                    item.matched.push(self.name.clone());
                    (Step::Pass, false)
                }
                Ok(false) => (Step::Gone, false),
                Err(e) => (Step::Fail(e), false),
            },
            Action::Sample(s) => (if s.take(&item.fields) { Step::Pass } else { Step::Gone }, false),
            Action::Pseudonymise { fields, mac } => {
                let mut changed = false;
                for f in fields.iter() {
                    if let Some(v) = item.fields.get_mut(f)
                        && *v != Value::Null
                    {
                        let mut m = (**mac).clone();
                        match &*v {
                            Value::Str(text) => m.update(text.as_bytes()),
                            other => m.update(other.to_text().as_bytes()),
                        }
                        *v = Value::Str(hex(&m.finalize().into_bytes()));
                        changed = true;
                    }
                }
                (Step::Pass, changed)
            }
            Action::Mask { fields, keep_last } => {
                let mut changed = false;
                for f in fields.iter() {
                    if let Some(v) = item.fields.get_mut(f)
                        && *v != Value::Null
                    {
                        *v = Value::Str(mask(&v.to_text(), *keep_last));
                        changed = true;
                    }
                }
                (Step::Pass, changed)
            }
            Action::Remove(fields) => {
                let mut changed = false;
                for f in fields.iter() {
                    changed |= item.fields.remove(f);
                }
                (Step::Pass, changed)
            }
            Action::Enrich(attrs) => {
                item.attrs.extend(attrs.iter().cloned());
                if !item.matched.is_empty() {
                    item.attrs.push((shared::batch::attr::RULE.into(), item.matched.join(",")));
                }
                (Step::Pass, true)
            }
            Action::Dedup(d) => (if d.is_new(item) { Step::Pass } else { Step::Gone }, false),
            Action::Downsample(d) => match d.fold(item) {
                Ok(()) => (Step::Gone, false),
                Err(e) => (Step::Fail(e), false),
            },
        };
        let counter = match (&step, changed) {
            (Step::Gone, _) => &self.counters.dropped,
            (Step::Pass, true) => &self.counters.changed,
            _ => &self.counters.kept,
        };
        if !matches!(step, Step::Fail(_)) {
            counter.fetch_add(1, Relaxed);
        }
        if changed && !matches!(self.action, Action::Enrich(_)) {
            item.matched.push(self.name.clone());
        }
        step
    }

    /// Whether the rule holds records across calls (refused on `backpressure` streams).
    pub fn is_windowed(&self) -> bool {
        matches!(self.action, Action::Dedup(_) | Action::Downsample(_))
    }
}

fn mask(text: &str, keep_last: usize) -> String {
    let n = text.chars().count();
    text.chars().enumerate().map(|(i, c)| if i + keep_last < n { '*' } else { c }).collect()
}

/// A compiled CEL predicate over `record` (the fields), `topic` and `ts_ms`.
#[derive(Debug)]
pub struct Predicate {
    program: cel::Program,
    /// The native form, where the expression has one (module doc).
    native: Option<Native>,
    /// Field names as CEL map keys, made once.
    keys: Vec<(String, cel::objects::Key)>,
    /// The fields it selects; `None`: all of them.
    fields: Option<Vec<String>>,
    uses_topic: bool,
    uses_ts: bool,
}

/// Variables a predicate may use.
pub const PREDICATE_VARIABLES: [&str; 3] = ["record", "topic", "ts_ms"];

impl Predicate {
    /// Parses `source`; the error says where and why.
    pub fn compile(source: &str) -> Result<Predicate, String> {
        let program = cel::Program::compile(source).map_err(|e| format!("CEL: {e}"))?;
        let refs = program.references();
        let (mut named, mut whole) = (BTreeSet::new(), false);
        collect_fields(program.expression(), &mut named, &mut whole);
        let mut idents = BTreeSet::new();
        collect_idents(program.expression(), &mut idents);
        if let Some(v) = idents.iter().find(|v| !PREDICATE_VARIABLES.contains(&v.as_str())) {
            return Err(format!("CEL: unknown variable {v:?} (a predicate sees record, topic and ts_ms)"));
        }
        let fields: Option<Vec<String>> = (!whole).then(|| named.into_iter().collect());
        let keys =
            fields.iter().flatten().map(|n| (n.clone(), cel::objects::Key::String(Arc::new(n.clone())))).collect();
        Ok(Predicate {
            native: Native::compile(program.expression()),
            keys,
            fields,
            uses_topic: refs.has_variable("topic"),
            uses_ts: refs.has_variable("ts_ms"),
            program,
        })
    }

    /// Evaluates it on `item`: true or false, or why it could not.
    pub fn eval(&self, item: &Item) -> Result<bool, String> {
        if let Some(b) = self.native.as_ref().and_then(|n| n.eval(&item.fields)) {
            return Ok(b);
        }
        self.eval_cel(item)
    }

    /// Evaluates it with the CEL interpreter only.
    pub fn eval_cel(&self, item: &Item) -> Result<bool, String> {
        ROOT.with(|root| {
            let mut ctx = root.new_inner_scope();
            let mut map = HashMap::with_capacity(self.keys.len());
            match &self.fields {
                Some(_) => {
                    for (n, key) in &self.keys {
                        if let Some(v) = item.fields.get(n) {
                            map.insert(key.clone(), to_cel(v));
                        }
                    }
                }
                None => {
                    for (n, v) in &item.fields.0 {
                        map.insert(cel::objects::Key::String(Arc::new(n.clone())), to_cel(v));
                    }
                }
            }
            ctx.add_variable_from_value("record", cel::Value::Map(cel::objects::Map { map: Arc::new(map) }));
            if self.uses_topic {
                ctx.add_variable_from_value("topic", cel::Value::String(Arc::new(item.topic.clone())));
            }
            if self.uses_ts {
                ctx.add_variable_from_value("ts_ms", cel::Value::Int(item.ts_ms));
            }
            match self.program.execute(&ctx) {
                Ok(cel::Value::Bool(b)) => Ok(b),
                Ok(v) => Err(format!("predicate gave {v:?}, not a bool")),
                Err(e) => Err(e.to_string()),
            }
        })
    }
}

/// A predicate compiled to native comparisons of typed fields (module doc). `eval` gives
/// `None` wherever CEL's answer could differ (a missing field, mixed types): CEL decides those.
#[derive(Clone, Debug, PartialEq)]
pub enum Native {
    /// `a && b`.
    And(Box<Native>, Box<Native>),
    /// `a || b`.
    Or(Box<Native>, Box<Native>),
    /// `!a`.
    Not(Box<Native>),
    /// `record.<field> <op> literal`.
    Cmp(String, CmpOp, Literal),
    /// `record.<field>` holding a bool.
    Field(String),
}

/// A comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

/// A literal a native comparison holds.
#[derive(Clone, Debug, PartialEq)]
pub enum Literal {
    /// Integer.
    Int(i64),
    /// Double.
    Float(f64),
    /// String.
    Str(String),
    /// Bool.
    Bool(bool),
}

impl Native {
    /// The native form of `e`, if it has one.
    pub fn compile(e: &Expression) -> Option<Native> {
        use cel::common::ast::operators as op;
        let Expr::Call(c) = &e.expr else {
            return record_field(e).map(Native::Field);
        };
        if c.target.is_some() {
            return None;
        }
        match (c.func_name.as_str(), c.args.as_slice()) {
            (op::LOGICAL_AND, [a, b]) => {
                Some(Native::And(Box::new(Native::compile(a)?), Box::new(Native::compile(b)?)))
            }
            (op::LOGICAL_OR, [a, b]) => Some(Native::Or(Box::new(Native::compile(a)?), Box::new(Native::compile(b)?))),
            (op::LOGICAL_NOT, [a]) => Some(Native::Not(Box::new(Native::compile(a)?))),
            (name, [a, b]) => {
                let cmp = match name {
                    op::EQUALS => CmpOp::Eq,
                    op::NOT_EQUALS => CmpOp::Ne,
                    op::LESS => CmpOp::Lt,
                    op::LESS_EQUALS => CmpOp::Le,
                    op::GREATER => CmpOp::Gt,
                    op::GREATER_EQUALS => CmpOp::Ge,
                    _ => return None,
                };
                match (record_field(a), literal(b), record_field(b), literal(a)) {
                    (Some(f), Some(l), _, _) => Some(Native::Cmp(f, cmp, l)),
                    (_, _, Some(f), Some(l)) => Some(Native::Cmp(f, cmp.flipped(), l)),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// The predicate's value on `fields`, or `None`: ask CEL.
    pub fn eval(&self, fields: &Fields) -> Option<bool> {
        match self {
            Native::And(a, b) => match a.eval(fields)? {
                false => Some(false),
                true => b.eval(fields),
            },
            Native::Or(a, b) => match a.eval(fields)? {
                true => Some(true),
                false => b.eval(fields),
            },
            Native::Not(a) => a.eval(fields).map(|b| !b),
            Native::Field(f) => match fields.get(f)? {
                Value::Bool(b) => Some(*b),
                _ => None,
            },
            Native::Cmp(f, op, lit) => {
                let ord = match (fields.get(f)?, lit) {
                    (Value::Int(a), Literal::Int(b)) => a.partial_cmp(b),
                    (Value::Float(a), Literal::Float(b)) => a.partial_cmp(b),
                    (Value::Str(a), Literal::Str(b)) => a.as_str().partial_cmp(b.as_str()),
                    (Value::Bool(a), Literal::Bool(b)) if matches!(op, CmpOp::Eq | CmpOp::Ne) => a.partial_cmp(b),
                    _ => return None,
                };
                let Some(ord) = ord else {
                    return None; // NaN: let CEL say
                };
                Some(match op {
                    CmpOp::Eq => ord.is_eq(),
                    CmpOp::Ne => ord.is_ne(),
                    CmpOp::Lt => ord.is_lt(),
                    CmpOp::Le => ord.is_le(),
                    CmpOp::Gt => ord.is_gt(),
                    CmpOp::Ge => ord.is_ge(),
                })
            }
        }
    }
}

impl CmpOp {
    /// The same comparison with its operands swapped.
    fn flipped(self) -> CmpOp {
        match self {
            CmpOp::Lt => CmpOp::Gt,
            CmpOp::Le => CmpOp::Ge,
            CmpOp::Gt => CmpOp::Lt,
            CmpOp::Ge => CmpOp::Le,
            other => other,
        }
    }
}

fn record_field(e: &Expression) -> Option<String> {
    match &e.expr {
        Expr::Select(s) if !s.test && matches!(&s.operand.expr, Expr::Ident(id) if id == "record") => {
            Some(s.field.clone())
        }
        _ => None,
    }
}

fn literal(e: &Expression) -> Option<Literal> {
    use cel::common::ast::LiteralValue as L;
    match &e.expr {
        Expr::Literal(L::Int(i)) => Some(Literal::Int(*i.inner())),
        Expr::Literal(L::Double(d)) => Some(Literal::Float(*d.inner())),
        Expr::Literal(L::String(s)) => Some(Literal::Str(s.inner().to_owned())),
        Expr::Literal(L::Boolean(b)) => Some(Literal::Bool(*b.inner())),
        _ => None,
    }
}

thread_local! {
    /// The CEL standard library, built once per thread (building it per record would cost
    /// more than the evaluation).
    static ROOT: cel::Context<'static, 'static> = cel::Context::default();
}

fn to_cel(v: &Value) -> cel::Value {
    match v {
        Value::Null => cel::Value::Null,
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Int(i) => cel::Value::Int(*i),
        Value::Float(f) => cel::Value::Float(*f),
        Value::Str(s) => cel::Value::String(Arc::new(s.clone())),
        Value::Bytes(b) => cel::Value::Bytes(Arc::new(b.clone())),
        Value::List(l) => cel::Value::List(Arc::new(l.iter().map(to_cel).collect())),
        Value::Map(m) => cel::Value::Map(cel::objects::Map {
            map: Arc::new(m.iter().map(|(k, v)| (cel::objects::Key::String(Arc::new(k.clone())), to_cel(v))).collect()),
        }),
    }
}

/// Collects `record.<field>` selections; any other use of `record` sets `whole`.
fn collect_fields(e: &Expression, named: &mut BTreeSet<String>, whole: &mut bool) {
    match &e.expr {
        Expr::Select(s) => {
            if matches!(&s.operand.expr, Expr::Ident(id) if id == "record") {
                named.insert(s.field.clone());
            } else {
                collect_fields(&s.operand, named, whole);
            }
        }
        Expr::Ident(id) => {
            if id == "record" {
                *whole = true;
            }
        }
        Expr::Call(c) => {
            if let Some(t) = &c.target {
                collect_fields(t, named, whole);
            }
            for a in &c.args {
                collect_fields(a, named, whole);
            }
        }
        Expr::Comprehension(c) => {
            for x in [&c.iter_range, &c.accu_init, &c.loop_cond, &c.loop_step, &c.result] {
                collect_fields(x, named, whole);
            }
        }
        Expr::List(l) => l.elements.iter().for_each(|x| collect_fields(x, named, whole)),
        Expr::Map(m) => m.entries.iter().for_each(|en| match &en.expr {
            EntryExpr::StructField(f) => collect_fields(&f.value, named, whole),
            EntryExpr::MapEntry(me) => {
                collect_fields(&me.key, named, whole);
                collect_fields(&me.value, named, whole);
            }
        }),
        Expr::Struct(s) => s.entries.iter().for_each(|en| match &en.expr {
            EntryExpr::StructField(f) => collect_fields(&f.value, named, whole),
            EntryExpr::MapEntry(me) => {
                collect_fields(&me.key, named, whole);
                collect_fields(&me.value, named, whole);
            }
        }),
        Expr::Literal(_) | Expr::Unspecified => {}
    }
}

/// Free identifiers at the root of each name (comprehension variables excluded).
fn collect_idents(e: &Expression, out: &mut BTreeSet<String>) {
    fn walk(e: &Expression, bound: &mut Vec<String>, out: &mut BTreeSet<String>) {
        match &e.expr {
            Expr::Ident(id) if !id.starts_with('@') && !bound.contains(id) => {
                out.insert(id.clone());
            }
            Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
            Expr::Select(s) => walk(&s.operand, bound, out),
            Expr::Call(c) => {
                if let Some(t) = &c.target {
                    walk(t, bound, out);
                }
                c.args.iter().for_each(|a| walk(a, bound, out));
            }
            Expr::Comprehension(c) => {
                walk(&c.iter_range, bound, out);
                walk(&c.accu_init, bound, out);
                bound.push(c.iter_var.clone());
                bound.extend(c.iter_var2.clone());
                bound.push(c.accu_var.clone());
                for x in [&c.loop_cond, &c.loop_step, &c.result] {
                    walk(x, bound, out);
                }
            }
            Expr::List(l) => l.elements.iter().for_each(|x| walk(x, bound, out)),
            Expr::Map(m) => m.entries.iter().for_each(|en| entry(&en.expr, bound, out)),
            Expr::Struct(s) => s.entries.iter().for_each(|en| entry(&en.expr, bound, out)),
        }
    }
    fn entry(en: &EntryExpr, bound: &mut Vec<String>, out: &mut BTreeSet<String>) {
        match en {
            EntryExpr::StructField(f) => walk(&f.value, bound, out),
            EntryExpr::MapEntry(me) => {
                walk(&me.key, bound, out);
                walk(&me.value, bound, out);
            }
        }
    }
    walk(e, &mut Vec::new(), out);
}

/// `sample`: 1 in `every`, globally or per key. Per-key counts are bounded by `keys_max`;
/// when full the counts start over (a sample, not a ledger).
#[derive(Debug)]
pub struct Sampler {
    every: u64,
    key: Vec<String>,
    keys_max: usize,
    global: u64,
    per_key: HashMap<String, u64>,
}

impl Sampler {
    /// Keeps the first of every `every` records (per key if `key` names fields).
    pub fn new(every: u64, key: Vec<String>, keys_max: usize) -> Sampler {
        Sampler { every: every.max(1), key, keys_max, global: 0, per_key: HashMap::new() }
    }

    fn take(&mut self, fields: &Fields) -> bool {
        let n = if self.key.is_empty() {
            &mut self.global
        } else {
            let k = key_of(&self.key, fields);
            if !self.per_key.contains_key(&k) && self.per_key.len() >= self.keys_max {
                self.per_key.clear();
            }
            self.per_key.entry(k).or_insert(0)
        };
        let take = *n % self.every == 0;
        *n += 1;
        take
    }
}

fn key_of(names: &[String], fields: &Fields) -> String {
    let mut k = String::new();
    for (i, n) in names.iter().enumerate() {
        if i > 0 {
            k.push('\u{1f}');
        }
        k.push_str(&fields.get(n).map_or_else(|| "\u{0}".into(), Value::to_text));
    }
    k
}

/// `dedup`: a record whose key was first seen less than `window_ms` before it (event time) is
/// a duplicate. At most `keys_max` keys are remembered; past that the oldest are forgotten.
#[derive(Debug)]
pub struct Dedup {
    key: Vec<String>,
    window_ms: i64,
    keys_max: usize,
    seen: HashMap<String, i64>,
    order: VecDeque<(i64, String)>,
}

impl Dedup {
    /// A dedup by `key` fields within `window_ms`.
    pub fn new(key: Vec<String>, window_ms: i64, keys_max: usize) -> Dedup {
        Dedup { key, window_ms, keys_max: keys_max.max(1), seen: HashMap::new(), order: VecDeque::new() }
    }

    fn is_new(&mut self, item: &Item) -> bool {
        let horizon = item.ts_ms.saturating_sub(self.window_ms);
        while let Some((ts, _)) = self.order.front() {
            if *ts > horizon && self.order.len() < self.keys_max {
                break;
            }
            let (ts, k) = self.order.pop_front().expect("front exists");
            if self.seen.get(&k) == Some(&ts) {
                self.seen.remove(&k);
            }
        }
        let k = key_of(&self.key, &item.fields);
        match self.seen.get(&k) {
            Some(first) if item.ts_ms.saturating_sub(*first) < self.window_ms => false,
            _ => {
                self.seen.insert(k.clone(), item.ts_ms);
                self.order.push_back((item.ts_ms, k));
                true
            }
        }
    }
}

/// Where `downsample` finds a series' device, metric and value.
#[derive(Clone, Debug, PartialEq)]
pub enum Series {
    /// Long form: one metric per record, named by field `metric`, its value in field `value`.
    Long {
        /// Field naming the metric.
        metric: String,
        /// Field holding the value.
        value: String,
    },
    /// Wide form: each of these fields is a metric of its own.
    Wide(Vec<String>),
}

/// `downsample`: per device and metric and aligned window of `window_ms` (event time), the
/// min / max / mean / count / last of the values. A window is emitted once a later window of
/// its series starts or [`Downsampler::poll`] is past its end. At most `series_max` series
/// are open at once; a record that would open one more is dead-lettered.
#[derive(Debug)]
pub struct Downsampler {
    device: String,
    series: Series,
    window_ms: i64,
    series_max: usize,
    open: HashMap<(String, String), Aggregate>,
    ready: Vec<Item>,
    /// No open window starts before this (a lower bound), so a poll before its end skips the scan.
    earliest_ms: Option<i64>,
}

#[derive(Clone, Debug)]
struct Aggregate {
    start_ms: i64,
    topic: String,
    count: u64,
    min: f64,
    max: f64,
    sum: f64,
    last: f64,
}

/// The pseudo field that names the topic as a device.
pub const TOPIC_FIELD: &str = "$topic";

impl Downsampler {
    /// A downsampler; `device` is a field name or `$topic`.
    pub fn new(device: String, series: Series, window_ms: i64, series_max: usize) -> Downsampler {
        Downsampler {
            device,
            series,
            window_ms: window_ms.max(1),
            series_max,
            open: HashMap::new(),
            ready: Vec::new(),
            earliest_ms: None,
        }
    }

    fn fold(&mut self, item: &Item) -> Result<(), String> {
        let device = if self.device == TOPIC_FIELD {
            item.topic.clone()
        } else {
            item.fields.get(&self.device).map(Value::to_text).ok_or_else(|| format!("no field {:?}", self.device))?
        };
        let points: Vec<(String, f64)> = match &self.series {
            Series::Long { metric, value } => {
                let m = item.fields.get(metric).map(Value::to_text).ok_or_else(|| format!("no field {metric:?}"))?;
                let v = item
                    .fields
                    .get(value)
                    .and_then(Value::as_f64)
                    .ok_or_else(|| format!("field {value:?} is missing or not a number"))?;
                vec![(m, v)]
            }
            Series::Wide(names) => names
                .iter()
                .filter_map(|n| item.fields.get(n).and_then(Value::as_f64).map(|v| (n.clone(), v)))
                .collect(),
        };
        if points.is_empty() {
            return Err("no numeric value to downsample".into());
        }
        let start = item.ts_ms.saturating_sub(item.ts_ms.rem_euclid(self.window_ms));
        for (metric, v) in points {
            let key = (device.clone(), metric);
            match self.open.get_mut(&key) {
                Some(a) if a.start_ms == start => a.add(v, &item.topic),
                Some(a) if start < a.start_ms => a.add(v, &item.topic), // late: into the open window
                Some(a) => {
                    let done = std::mem::replace(a, Aggregate::new(start, v, &item.topic));
                    self.ready.push(done.into_item(&key, self.window_ms));
                }
                None => {
                    if self.open.len() >= self.series_max {
                        return Err(format!("more than series_max {} open series", self.series_max));
                    }
                    self.open.insert(key, Aggregate::new(start, v, &item.topic));
                }
            }
            self.earliest_ms = Some(self.earliest_ms.map_or(start, |e| e.min(start)));
        }
        Ok(())
    }

    /// Aggregates whose window ended at or before `now_ms` (all with `None`), in window order.
    pub fn poll(&mut self, now_ms: Option<i64>) -> Vec<Item> {
        let w = self.window_ms;
        if let (Some(now), Some(earliest)) = (now_ms, self.earliest_ms)
            && earliest.saturating_add(w) > now
            && self.ready.is_empty()
        {
            return Vec::new(); // nothing can be due yet: no scan per tick
        }
        let due: Vec<(String, String)> = self
            .open
            .iter()
            .filter(|(_, a)| now_ms.is_none_or(|now| a.start_ms.saturating_add(w) <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for k in due {
            let a = self.open.remove(&k).expect("listed above");
            self.ready.push(a.into_item(&k, w));
        }
        self.earliest_ms = self.open.values().map(|a| a.start_ms).min();
        let mut out = std::mem::take(&mut self.ready);
        out.sort_by(|a, b| {
            (a.ts_ms, a.fields.get("device").map(Value::to_text), a.fields.get("metric").map(Value::to_text)).cmp(&(
                b.ts_ms,
                b.fields.get("device").map(Value::to_text),
                b.fields.get("metric").map(Value::to_text),
            ))
        });
        out
    }
}

impl Aggregate {
    fn new(start_ms: i64, v: f64, topic: &str) -> Aggregate {
        Aggregate { start_ms, topic: topic.to_owned(), count: 1, min: v, max: v, sum: v, last: v }
    }

    fn add(&mut self, v: f64, topic: &str) {
        self.count += 1;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.sum += v;
        self.last = v;
        if self.topic != topic {
            self.topic = topic.to_owned();
        }
    }

    fn into_item(self, key: &(String, String), window_ms: i64) -> Item {
        let fields = Fields(vec![
            ("device".into(), Value::Str(key.0.clone())),
            ("metric".into(), Value::Str(key.1.clone())),
            ("window_start_ms".into(), Value::Int(self.start_ms)),
            ("window_ms".into(), Value::Int(window_ms)),
            ("count".into(), Value::Int(self.count as i64)),
            ("min".into(), Value::Float(self.min)),
            ("max".into(), Value::Float(self.max)),
            ("mean".into(), Value::Float(self.sum / self.count as f64)),
            ("last".into(), Value::Float(self.last)),
        ]);
        Item { ts_ms: self.start_ms, topic: self.topic, fields, attrs: Vec::new(), matched: Vec::new() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(ts_ms: i64, json: &str) -> Item {
        Item {
            ts_ms,
            topic: "cdr/site1".into(),
            fields: Fields::decode_json(json.as_bytes()).unwrap(),
            attrs: vec![],
            matched: vec![],
        }
    }

    fn rule(action: Action) -> Rule {
        Rule { name: "r".into(), action, counters: Arc::default() }
    }

    #[test]
    fn predicates_select_only_the_fields_they_name() {
        let p = Predicate::compile(r#"record.duration_s < 1 && record.record_type == "voice""#).unwrap();
        assert_eq!(p.fields, Some(vec!["duration_s".into(), "record_type".into()]));
        assert!(p.eval(&item(0, r#"{"duration_s":0,"record_type":"voice","imsi":"1"}"#)).unwrap());
        assert!(!p.eval(&item(0, r#"{"duration_s":5,"record_type":"voice"}"#)).unwrap());
        let whole = Predicate::compile(r#"size(record) > 2 && topic.startsWith("cdr/")"#).unwrap();
        assert_eq!(whole.fields, None);
        assert!(whole.eval(&item(0, r#"{"a":1,"b":2,"c":3}"#)).unwrap());
    }

    #[test]
    fn common_filters_compile_to_native_form() {
        let p = Predicate::compile(r#"record.duration_s < 1 && record.record_type == "voice""#).unwrap();
        assert_eq!(
            p.native,
            Some(Native::And(
                Box::new(Native::Cmp("duration_s".into(), CmpOp::Lt, Literal::Int(1))),
                Box::new(Native::Cmp("record_type".into(), CmpOp::Eq, Literal::Str("voice".into()))),
            ))
        );
        let p = Predicate::compile("1.5 >= record.dur || !record.ok").unwrap();
        assert_eq!(
            p.native,
            Some(Native::Or(
                Box::new(Native::Cmp("dur".into(), CmpOp::Le, Literal::Float(1.5))),
                Box::new(Native::Not(Box::new(Native::Field("ok".into())))),
            ))
        );
        assert_eq!(Predicate::compile(r#"topic.startsWith("cdr/")"#).unwrap().native, None);
        assert_eq!(Predicate::compile("record.a + 1 > 2").unwrap().native, None);
    }

    proptest::proptest! {
        /// The native form answers exactly as CEL does, or leaves the record to CEL.
        #[test]
        fn native_and_cel_agree(
            expr in proptest::sample::select(vec![
                "record.a < 3 && record.s == \"x\"",
                "record.a >= 2 || record.f < 0.5",
                "!(record.s != \"y\") && record.b",
                "2 < record.a || !record.b",
                "record.f == 1.0 || record.a == 1",
            ]),
            a in proptest::option::of(-2i64..5),
            f in proptest::option::of(proptest::prop_oneof![-1.0f64..2.0, proptest::strategy::Just(f64::NAN)]),
            s in proptest::option::of(proptest::sample::select(vec!["x", "y", ""])),
            b in proptest::option::of(proptest::bool::ANY),
            mixed in proptest::bool::ANY,
        ) {
            let p = Predicate::compile(expr).unwrap();
            proptest::prop_assert!(p.native.is_some());
            let mut fields = Vec::new();
            if let Some(a) = a {
                // Sometimes the "wrong" type, so the native form must step aside.
                fields.push(("a".to_owned(), if mixed { Value::Str(a.to_string()) } else { Value::Int(a) }));
            }
            if let Some(f) = f { fields.push(("f".to_owned(), Value::Float(f))); }
            if let Some(s) = s { fields.push(("s".to_owned(), Value::Str(s.into()))); }
            if let Some(b) = b { fields.push(("b".to_owned(), Value::Bool(b))); }
            let it = Item { ts_ms: 0, topic: "t".into(), fields: Fields(fields), attrs: vec![], matched: vec![] };
            let cel = p.eval_cel(&it);
            if let Some(native) = p.native.as_ref().unwrap().eval(&it.fields) {
                proptest::prop_assert_eq!(Ok(native), cel.clone(), "{}", expr);
            }
            proptest::prop_assert_eq!(p.eval(&it), cel, "{}", expr);
        }
    }

    #[test]
    fn predicate_errors_are_reported_not_panicked() {
        assert!(Predicate::compile("record.a <").unwrap_err().starts_with("CEL"));
        assert!(Predicate::compile("rec.a == 1").unwrap_err().contains("unknown variable \"rec\""));
        let p = Predicate::compile("record.missing == 1").unwrap();
        assert!(p.eval(&item(0, r#"{"a":1}"#)).unwrap_err().contains("missing"));
        let p = Predicate::compile("record.a + 1").unwrap();
        assert!(p.eval(&item(0, r#"{"a":1}"#)).unwrap_err().contains("not a bool"));
        let p = Predicate::compile("has(record.a) && record.a == 1").unwrap();
        assert!(!p.eval(&item(0, r#"{"b":1}"#)).unwrap());
    }

    #[test]
    fn pseudonymise_is_keyed_stable_and_counted() {
        let mac = Box::new(<Hmac<Sha256> as hmac::KeyInit>::new_from_slice(b"0123456789abcdef").unwrap());
        let mut r = rule(Action::Pseudonymise { fields: vec!["imsi".into(), "absent".into()], mac });
        let mut a = item(0, r#"{"imsi":"001010123456789","n":1}"#);
        let mut b = item(0, r#"{"imsi":"001010123456789","n":2}"#);
        r.apply(&mut a);
        r.apply(&mut b);
        let Some(Value::Str(h)) = a.fields.get("imsi") else { panic!() };
        assert_eq!(h.len(), 64);
        assert_ne!(h, "001010123456789");
        assert_eq!(a.fields.get("imsi"), b.fields.get("imsi"), "the same input joins");
        // RFC 4231-style check against an independent computation of HMAC-SHA-256.
        let mut m = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(b"0123456789abcdef").unwrap();
        m.update(b"001010123456789");
        assert_eq!(h, &hex(&m.finalize().into_bytes()));
        assert_eq!(r.counters.load(), (0, 0, 2));
    }

    #[test]
    fn mask_remove_enrich() {
        let mut m = rule(Action::Mask { fields: vec!["msisdn".into()], keep_last: 3 });
        let mut it = item(0, r#"{"msisdn":"447700900123","ip":"10.0.0.1"}"#);
        m.apply(&mut it);
        assert_eq!(it.fields.get("msisdn"), Some(&Value::Str("*********123".into())));
        let mut r = rule(Action::Remove(vec!["ip".into()]));
        r.apply(&mut it);
        assert_eq!(it.fields.get("ip"), None);
        let mut e = rule(Action::Enrich(vec![("site".into(), "lon1".into())]));
        e.apply(&mut it);
        assert_eq!(it.attrs, vec![("site".into(), "lon1".into()), ("rule".into(), "r,r".into())]);
    }

    #[test]
    fn sample_global_and_per_key() {
        let mut s = rule(Action::Sample(Sampler::new(3, vec![], 10)));
        let kept = (0..9).filter(|_| matches!(s.apply(&mut item(0, "{}")), Step::Pass)).count();
        assert_eq!(kept, 3);
        assert_eq!(s.counters.load(), (3, 6, 0));
        let mut s = rule(Action::Sample(Sampler::new(2, vec!["d".into()], 10)));
        let mut kept = Vec::new();
        for d in ["a", "a", "b", "a", "b", "b"] {
            if matches!(s.apply(&mut item(0, &format!(r#"{{"d":"{d}"}}"#))), Step::Pass) {
                kept.push(d);
            }
        }
        assert_eq!(kept, vec!["a", "b", "a", "b"]);
    }

    #[test]
    fn dedup_within_the_window_only() {
        let mut d = rule(Action::Dedup(Dedup::new(vec!["id".into()], 1000, 100)));
        let mut pass = |ts, id: &str| matches!(d.apply(&mut item(ts, &format!(r#"{{"id":"{id}"}}"#))), Step::Pass);
        assert!(pass(0, "x"));
        assert!(!pass(500, "x"), "a retransmission inside the window");
        assert!(pass(600, "y"));
        assert!(pass(1000, "x"), "the window has passed");
        assert!(!pass(1999, "x"));
    }

    #[test]
    fn dedup_forgets_the_oldest_past_keys_max() {
        let mut d = Dedup::new(vec!["id".into()], 1_000_000, 2);
        for id in ["a", "b", "c"] {
            assert!(d.is_new(&item(0, &format!(r#"{{"id":"{id}"}}"#))));
        }
        assert!(d.seen.len() <= 2 + 1);
        assert!(d.is_new(&item(1, r#"{"id":"a"}"#)), "a was forgotten");
    }

    #[test]
    fn downsample_long_and_wide() {
        let series = Series::Long { metric: "n".into(), value: "v".into() };
        let mut d = Downsampler::new("dev".into(), series, 1000, 10);
        for (ts, v) in [(0, 1.0), (10, 3.0), (999, 2.0)] {
            d.fold(&item(ts, &format!(r#"{{"dev":"d1","n":"temp","v":{v}}}"#))).unwrap();
        }
        d.fold(&item(1500, r#"{"dev":"d1","n":"temp","v":7}"#)).unwrap();
        let out = d.poll(Some(1500));
        assert_eq!(out.len(), 1, "the second window is still open");
        let f = &out[0].fields;
        assert_eq!(f.get("count"), Some(&Value::Int(3)));
        assert_eq!((f.get("min"), f.get("max")), (Some(&Value::Float(1.0)), Some(&Value::Float(3.0))));
        assert_eq!((f.get("mean"), f.get("last")), (Some(&Value::Float(2.0)), Some(&Value::Float(2.0))));
        assert_eq!(d.poll(Some(2000)).len(), 1);
        let mut w = Downsampler::new(TOPIC_FIELD.into(), Series::Wide(vec!["t".into(), "h".into()]), 60_000, 1);
        w.fold(&item(5, r#"{"t":20.5,"h":40}"#)).unwrap_err(); // two series, bound is one
        let mut w = Downsampler::new(TOPIC_FIELD.into(), Series::Wide(vec!["t".into(), "h".into()]), 60_000, 10);
        w.fold(&item(5, r#"{"t":20.5,"h":40}"#)).unwrap();
        let mut end = Downsampler::new(TOPIC_FIELD.into(), Series::Wide(vec!["t".into()]), 60_000, 10);
        end.fold(&item(i64::MAX, r#"{"t":1}"#)).unwrap();
        end.fold(&item(i64::MIN, r#"{"t":1}"#)).unwrap();
        assert_eq!(end.poll(Some(i64::MAX)).len(), 1, "times at the ends of the range do not overflow");
        let out = w.poll(None);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].fields.get("device"), Some(&Value::Str("cdr/site1".into())));
        assert!(w.fold(&item(5, r#"{"x":1}"#)).unwrap_err().contains("no numeric value"));
    }
}
